"""Issue 18's target 1: does fitting `slim` (budget 4: n_ce 7, r 41) against the whole model's
output help, after the study's block-by-block fit? The block fit matches each block's output in
mean squared error; this then trains only the compressed experts of all blocks together, for a
few Adam steps, on the KL divergence from the full model's next-token distribution on the same
calibration text (no labels: still training-free in the study's sense).

Run from the repository root: ``python scripts/slim_distill_probe.py`` (seed 0, lr 1e-4, 100 and
300 steps: about 5 minutes on two cores), or ``--seeds 0,1,2 --lr 1e-4 --steps 300``.
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import compressed_experts as ce
from compressed_experts.checkpoint import load_tokenizer
from compressed_experts.config import CEConfig
from compressed_experts.convert import convert
from compressed_experts.fit import calibration_blocks, fit
from compressed_experts.layer import is_compressed_expert
from compressed_experts.toy.pretrain import lm_loss
from compressed_experts.toy.tasks import domain_split

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seeds", default="0")
parser.add_argument("--lr", default="1e-4", help="comma-separated")
parser.add_argument("--steps", default="100,300", help="checkpoints scored along one run, comma-separated")
parser.add_argument("--batch", type=int, default=4, help="calibration sequences per step")
args = parser.parse_args()

tok = load_tokenizer("bundled")
base = ce.from_pretrained("bundled", dtype=torch.float32).eval()
calib_text, held = domain_split()
full = lm_loss(base, tok, held, 256, 32)
top4 = lm_loss(convert(copy.deepcopy(base), CEConfig(n_ce=4, form="none")), tok, held, 256, 32)
print(f"full top-8 {full:.4f}, top-4 {top4:.4f}", flush=True)
score = lambda m: (lambda loss: f"{loss:.4f} ({(top4 - loss) / (top4 - full):.1%})")(lm_loss(m, tok, held, 256, 32))  # noqa: E731
checkpoints = sorted(map(int, args.steps.split(",")))
for seed in map(int, args.seeds.split(",")):
    calib = calibration_blocks(tok, calib_text, 256, 16384, seed)
    fitted = convert(copy.deepcopy(base), CEConfig(n_ce=7, form="slim", r=41))
    fit(fitted, calib, steps=200, seed=seed, progress=False)
    print(f"seed {seed}: block fit {score(fitted)}", flush=True)
    for lr in map(float, args.lr.split(",")):
        model = copy.deepcopy(fitted)
        params = [p for n, p in model.named_parameters() if is_compressed_expert(n)]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        t = time.time()
        for step in range(1, checkpoints[-1] + 1):
            batch = calib[torch.randint(len(calib), (args.batch,), generator=gen)]
            with torch.no_grad():
                teacher = F.log_softmax(base(batch).logits.float(), dim=-1)
            model.train()
            student = F.log_softmax(model(batch).logits.float(), dim=-1)
            loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in checkpoints:
                print(f"seed {seed} lr {lr:g} step {step}: {score(model)} ({time.time() - t:.0f} s)", flush=True)
