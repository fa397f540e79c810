"""``train``: fine-tuning, with one flag per :class:`~compressed_experts.training.TrainConfig` setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.table import Table

from ..training import TrainConfig
from .app import app
from .common import console, releasing, run, settings_options, with_options


def train(**settings: Any) -> None:
    """Fine-tune a model with full top-k, top-m or compressed experts (the transformers Trainer;
    runs under accelerate launch or torchrun for many GPUs)."""
    from ..training import train as run_training  # the Trainer pulls in accelerate: only when training

    def action() -> None:
        config = TrainConfig(**settings)
        result = run_training(config)
        if int(os.environ.get("RANK", "0")) == 0:
            _show_summary(result.summary, Path(settings["out"]))

    run(releasing(settings["out"], action))  # the run's lock (see check_output_dir) ends with the command


def _show_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"trained -> {out}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("method", "rule", "trainable", "steps", "tokens", "precision"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-")
    table.add_row("active parameters per token", f"{summary['active_parameters']:,}")
    table.add_row("  full top-k would be", f"{summary['active_full_topk']:,}")
    table.add_row("trained parameters", f"{summary['trained_parameters']:,}")
    console.print(table)


app.command("train")(with_options(train, settings_options(TrainConfig)))
