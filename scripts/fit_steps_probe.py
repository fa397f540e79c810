"""Does fitting longer help issue 18's target 1? slim at budget 4 (n_ce 7, r 41, the methods study's
split) fitted 200 and 800 Adam steps per block on seed 0's calibration draw, held-out loss of each.

Run from the repository root: ``python scripts/fit_steps_probe.py`` (about 4 minutes on two cores).
"""

import copy
import time

import torch

import compressed_experts as ce
from compressed_experts.checkpoint import load_tokenizer
from compressed_experts.config import CEConfig
from compressed_experts.convert import convert
from compressed_experts.fit import calibration_blocks, fit
from compressed_experts.toy.pretrain import lm_loss
from compressed_experts.toy.tasks import domain_split

tok = load_tokenizer("bundled")
base = ce.from_pretrained("bundled", dtype=torch.float32)
calib_text, held = domain_split()
calib = calibration_blocks(tok, calib_text, 256, 16384, 0)
for steps in (200, 800):
    t = time.time()
    m = convert(copy.deepcopy(base), CEConfig(n_ce=7, form="slim", r=41))
    fit(m, calib, steps=steps, seed=0, progress=False)
    print(steps, round(lm_loss(m, tok, held, 256, 32), 4), f"{time.time() - t:.0f}s", flush=True)
