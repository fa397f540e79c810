"""Issue 18's target 1: how far does fitting `slim` at budget 4 close the top-4 -> full top-8 gap, by
setting, calibration tokens, Adam steps per block and seed?

Settings: the methods study's split (one main expert, n_ce 7, r 41), or a per-token number of main
experts with `slim` auxiliary ones (``top_p=0.39:r=32``: top_p alone closes 15% at budget 4, one main
expert with slim 75%; does letting the number of full experts follow the router's confidence do
better?). Each combination converts the bundled model, fits it on that seed's calibration draw (the
training files of the domain task, as the study draws them), measures its expert-equivalents on that
text and scores the study's held-out text (32 sequences of 256 tokens); full top-8 and top-4 are
scored in the same run for the gap.

Run from the repository root: ``python scripts/slim_fit_probe.py`` (the study's 16,384 tokens,
200 and 800 steps, seed 0: about 4 minutes on two cores), or e.g.
``python scripts/slim_fit_probe.py --tokens 65536 --steps 200 --seeds 0,1,2`` or
``python scripts/slim_fit_probe.py --settings top_p=0.39:r=32,top_p=0.55:r=19 --steps 200``.
"""

import argparse
import copy
import time

import torch

import compressed_experts as ce
from compressed_experts.checkpoint import load_tokenizer
from compressed_experts.config import CEConfig
from compressed_experts.convert import convert
from compressed_experts.fit import calibration_blocks, fit
from compressed_experts.parameters import active_parameters
from compressed_experts.toy.pretrain import lm_loss
from compressed_experts.toy.tasks import domain_split

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--tokens", default="16384", help="calibration tokens, comma-separated")
parser.add_argument("--steps", default="200,800", help="Adam steps per block, comma-separated")
parser.add_argument("--seeds", default="0", help="calibration draws (and fitting seeds), comma-separated")
parser.add_argument(
    "--settings", default="n_ce=7:r=41", help="CEConfig fields (form slim), ':'-joined, comma-separated"
)
args = parser.parse_args()

tok = load_tokenizer("bundled")
base = ce.from_pretrained("bundled", dtype=torch.float32)
calib_text, held = domain_split()
full = lm_loss(base, tok, held, 256, 32)
top4 = lm_loss(convert(copy.deepcopy(base), CEConfig(n_ce=4, form="none")), tok, held, 256, 32)
print(f"full top-8 {full:.4f}, top-4 {top4:.4f}", flush=True)


def config(text: str) -> CEConfig:
    fields = dict(part.split("=") for part in text.split(":"))
    return CEConfig(form="slim", **{k: float(v) if k in ("top_p", "skip_below") else int(v) for k, v in fields.items()})


for tokens in map(int, args.tokens.split(",")):
    for seed in map(int, args.seeds.split(",")):
        calib = calibration_blocks(tok, calib_text, 256, tokens, seed)
        for setting in args.settings.split(","):
            for steps in map(int, args.steps.split(",")):
                t = time.time()
                m = convert(copy.deepcopy(base), config(setting))
                fit(m, calib, steps=steps, seed=seed, progress=False)
                eq = active_parameters(m, input_ids=calib)["expert_equivalents"]
                loss = lm_loss(m, tok, held, 256, 32)
                closed = (top4 - loss) / (top4 - full)
                print(
                    f"{setting} tokens {tokens} seed {seed} steps {steps}: {eq:.2f} expert-equivalents, held-out "
                    f"loss {loss:.4f}, gap closed {closed:.1%} ({time.time() - t:.0f} s)",
                    flush=True,
                )
