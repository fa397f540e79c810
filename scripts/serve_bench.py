"""Greedy generation of the bundled model through vLLM against transformers' generate, in tokens/s.

Full top-k (the bundled model as shipped), top-m (n_ce 4, form none) and compressed experts
(n_ce 4, ia3, perturbed vectors) side by side, at 1, 8 and 64 concurrent requests of the same
prompt length. Runs in the serving environment (scripts/serve_env.sh):

    .venv-serve/bin/python scripts/serve_bench.py [--new-tokens 64] [--out results.json]

Both engines run in float32 on this machine's CPUs; transformers generates each batch with one
padded ``generate`` call (the prompts have equal length, so no padding is used), vLLM takes all
requests of a batch at once (``LLM.generate``), eager mode. Times are wall-clock, after one warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

VARIANTS = {"full top-k": None, "top-m": "none", "compressed experts": "ia3"}


def save_variants(root: Path) -> dict[str, Path]:
    import torch

    import compressed_experts as ce

    out = {}
    for name, form in VARIANTS.items():
        path = root / name.replace(" ", "-")
        if form is None:
            model = ce.from_pretrained("bundled", dtype="float32")
        else:
            model = ce.from_pretrained("bundled", n_ce=4, form=form, dtype="float32")
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    if ce.layer.is_compressed_expert(pname):
                        param.mul_(torch.empty(param.shape).uniform_(0.7, 1.3, generator=generator))
        model.save_pretrained(path)
        ce.load_tokenizer("bundled").save_pretrained(path)
        out[name] = path
    return out


def prompts(count: int, length: int = 16) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(count)
    return torch.randint(4, 4000, (count, length), generator=generator).tolist()


def transformers_rate(path: Path, batch: int, new_tokens: int) -> float:
    import torch

    import compressed_experts as ce

    model = ce.from_pretrained(str(path), dtype="float32").eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts(batch))
    kwargs = dict(do_sample=False, pad_token_id=1)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs
        )
        elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * batch / elapsed


def vllm_rates(path: Path, batches: list[int], new_tokens: int) -> dict[int, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(str(path), dtype="float32", enforce_eager=True, max_model_len=256, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts(1)[0]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    rates = {}
    for batch in batches:
        requests = [{"prompt_token_ids": p} for p in prompts(batch)]
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        rates[batch] = sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed
    del llm
    gc.collect()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in save_variants(Path(tmp)).items():
            served = vllm_rates(path, batches, args.new_tokens)
            for batch in batches:
                hf = transformers_rate(path, batch, args.new_tokens)
                rows.append(
                    {"variant": name, "requests": batch, "vllm_tokens_s": served[batch], "transformers_tokens_s": hf}
                )
    print(f"| variant | requests | vLLM tokens/s | transformers tokens/s | ratio |  ({os.cpu_count()} CPUs, float32)")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = row["vllm_tokens_s"] / row["transformers_tokens_s"]
        print(
            f"| {row['variant']} | {row['requests']} | {row['vllm_tokens_s']:.0f} | {row['transformers_tokens_s']:.0f} | {ratio:.1f}x |"
        )
    if args.out:
        args.out.write_text(json.dumps({"new_tokens": args.new_tokens, "cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
