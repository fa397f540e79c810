"""``train``: fine-tuning, with one flag per :class:`~compressed_experts.training.TrainConfig` setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.table import Table

from ..checkpoint import load_tokenizer, skeleton
from ..errors import CompressedExpertsError
from ..training import TrainConfig
from .app import app
from .common import console, releasing, run, settings_options, with_options


def train(**settings: Any) -> None:
    """Fine-tune a model with full top-k, top-m or compressed experts (the transformers Trainer;
    runs under accelerate launch or torchrun for many GPUs)."""
    from ..training import train as run_training  # the Trainer pulls in accelerate: only when training

    def action() -> None:
        config = TrainConfig(**settings)
        _check_vocabulary(config)
        result = run_training(config)
        if int(os.environ.get("RANK", "0")) == 0:
            _show_summary(result.summary, Path(settings["out"]))

    run(releasing(settings["out"], action))  # the run's lock (see check_output_dir) ends with the command


def _check_vocabulary(config: TrainConfig) -> None:
    """Refuse a --tokenizer with more tokens than the model has embeddings, before any data is read
    (its ids failed with an IndexError in the first step): reads the model's config, not its weights."""
    if config.tokenizer is None:
        return
    tokenizer = load_tokenizer(config.tokenizer)
    vocab = skeleton(config.model).get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise CompressedExpertsError(
            f"the tokenizer {config.tokenizer} has {len(tokenizer)} tokens but the model {config.model} only "
            f"{vocab} embeddings: use the tokenizer the model was trained with",
            settings=("tokenizer",),
        )


def _show_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"trained -> {out}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("method", "n_ce", "trainable", "steps", "tokens", "precision"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-")
    table.add_row("active parameters per token", f"{summary['active_parameters']:,}")
    table.add_row("  full top-k would be", f"{summary['active_full_topk']:,}")
    table.add_row("trained parameters", f"{summary['trained_parameters']:,}")
    console.print(table)


app.command("train")(with_options(train, settings_options(TrainConfig)))
