"""The recipe that made the bundled model: a BPE tokenizer and a small OLMoE, pretrained on the
standard library (see :mod:`.corpus`) through the same training pipeline users fine-tune with.

``compressed-experts toy pretrain --out DIR`` writes, under DIR: ``corpus/train.jsonl``,
``init/`` (tokenizer and randomly initialised model), ``run/`` (the training run: log,
checkpoints, resumable with ``--resume``) and ``model/``, the export that ships in the package
as ``compressed_experts/bundled_model`` (bfloat16 safetensors, tokenizer, ``pretrain_report.json``,
``loss_curve.png``).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_output_dir, from_pretrained, load_tokenizer, save_model
from ..errors import CompressedExpertsError
from ..sources import BUNDLED_DIR
from ..text import token_blocks
from .corpus import held_out_texts, training_texts, write_jsonl

EOS, PAD = "<|endoftext|>", "<|pad|>"


@dataclass(frozen=True)
class Recipe:
    """Architecture and schedule. OLMoE's routing (64 experts, top-8) at a width that fits 25 MB."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 96
    layers: int = 4
    heads: int = 4
    experts: int = 64
    top_k: int = 8
    seq_len: int = 256
    batch_size: int = 16
    max_steps: int = 2400
    lr: float = 3e-3
    seed: int = 0
    max_files: int | None = None  # a slice of the corpus, for quick tests of the recipe
    held_out_blocks: int = 64  # sequences of the held-out part scored at the end

    def __post_init__(self) -> None:
        small = {
            k: v
            for k, v in asdict(self).items()
            if k != "seed" and v is not None and not isinstance(v, bool) and not v > 0
        }
        if small:
            named = ", ".join(f"{k}={v}" for k, v in small.items())
            raise CompressedExpertsError(f"recipe settings must be positive: {named}", settings=tuple(small))
        if self.hidden_size % self.heads:
            raise CompressedExpertsError(
                f"hidden_size {self.hidden_size} must be a multiple of heads ({self.heads})",
                settings=("hidden_size", "heads"),
            )


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (every byte is representable: no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD)


def initial_model(recipe: Recipe, tokenizer):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        num_experts=recipe.experts,
        num_experts_per_tok=recipe.top_k,
        max_position_embeddings=2 * recipe.seq_len,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        output_router_logits=True,  # the load-balancing loss while pretraining; switched off in the export
    )
    torch.manual_seed(recipe.seed)
    return AutoModelForCausalLM.from_config(config)


def lm_loss(model, tokenizer, texts: list[str], seq_len: int, blocks: int, batch_size: int = 8) -> float:
    """Mean next-token loss over the first ``blocks`` packed sequences of ``texts`` (EOS between texts)."""
    return blocks_loss(model, token_blocks(tokenizer, texts, seq_len, blocks), batch_size)


def blocks_loss(model, data: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss over ``[n, seq_len]`` token ids (the methods study scores calibration blocks with it)."""
    usable = data.shape[0]
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, usable, batch_size):
            batch = data[start : start + batch_size]
            loss = model(batch, labels=batch).loss
            total += loss.item() * batch.numel()
            count += batch.numel()
    return total / count


def pretrain(out: Path, recipe: Recipe = Recipe(), resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole recipe into ``out``; return the report written beside the exported model."""
    from ..training import TrainConfig, train  # the Trainer and accelerate: imported when a run starts
    from ..training.run import LOG_FILE

    out = Path(out)
    held_out = held_out_texts()  # fails early on a Python without its test suite
    corpus = training_texts()[: recipe.max_files]
    started = time.perf_counter()
    # The library's output policy; --overwrite replaces only an earlier pretraining directory (one with init/).
    clear = check_output_dir(
        out, overwrite=overwrite, replaces="a toy pretraining directory", markers=("init",), keep=resume, resumable=True
    )
    if not resume:
        if clear:
            shutil.rmtree(out)
        write_jsonl(corpus, out / "corpus" / "train.jsonl")
        tokenizer = train_tokenizer([text for _, text in corpus], recipe.vocab_size)
        model = initial_model(recipe, tokenizer)
        model.save_pretrained(out / "init")
        tokenizer.save_pretrained(out / "init")
    result = train(
        TrainConfig(
            model=str(out / "init"),
            data=str(out / "corpus" / "train.jsonl"),
            out=str(out / "run"),
            method="full",
            lr=recipe.lr,
            warmup=0.02,
            weight_decay=0.1,
            max_steps=recipe.max_steps,
            seq_len=recipe.seq_len,
            batch_size=recipe.batch_size,
            seed=recipe.seed,
            precision="fp32",
            gradient_checkpointing=False,
            logging_steps=max(1, min(25, recipe.max_steps // 10)),
            save_steps=0.1,
            resume=resume,
        )
    )
    model = result.model
    model.config.output_router_logits = False
    tokenizer = load_tokenizer(out / "init")
    held_out_loss = lm_loss(model, tokenizer, [t for _, t in held_out], recipe.seq_len, recipe.held_out_blocks)
    export = out / "model"
    save_model(model.to(torch.bfloat16), export, tokenizer=tokenizer)
    shipped = from_pretrained(export, dtype=torch.float32)  # the score users reproduce: after the bf16 round trip
    report = {
        "recipe": asdict(recipe),
        "python": platform.python_version(),
        "corpus_files": len(corpus),
        "corpus_characters": sum(len(t) for _, t in corpus),
        "held_out_files": len(held_out),
        "tokens_seen": result.summary["tokens"],
        "train_seconds": result.summary["seconds"],
        "total_seconds": time.perf_counter() - started,
        "final_train_loss": result.summary["final_loss"],
        "held_out_loss": lm_loss(shipped, tokenizer, [t for _, t in held_out], recipe.seq_len, recipe.held_out_blocks),
        "held_out_loss_float32": held_out_loss,
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "safetensors_bytes": sum(f.stat().st_size for f in export.glob("*.safetensors")),
    }
    (export / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    plot_loss(out / "run" / LOG_FILE, export / "loss_curve.png", report)
    return report


def plot_loss(log_file: Path, png: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    points = [
        (e["num_input_tokens_seen"] / 1e6, e["loss"]) for e in entries if "loss" in e and "num_input_tokens_seen" in e
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], label="training loss")
    ax.axhline(
        report["held_out_loss"], color="tab:red", linestyle="--", label=f"held-out loss {report['held_out_loss']:.3f}"
    )
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Bundled model: pretraining on the standard library", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def ship_export(export: Path) -> Path:
    """Copy an exported model into the package as the bundled model (replacing the shipped one,
    :data:`compressed_experts.sources.BUNDLED_DIR`) and return where."""
    if BUNDLED_DIR.exists():
        shutil.rmtree(BUNDLED_DIR)
    shutil.copytree(export, BUNDLED_DIR)
    return BUNDLED_DIR
