"""The settings of one fine-tuning run, validated when built, stored beside the run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NoReturn

from ..config import CEConfig, Settings, setting
from ..errors import CompressedExpertsError
from ..forms import FORMS, TOP_M, get_form
from ..routing import RULES, rule_of
from ..text import PROMPT_FORMATS

#: full: the unmodified model (all k experts); top-m: routed to its top k - n_ce experts only;
#: ce: converted with compressed experts.
METHODS = ("full", "top-m", "ce")
#: Forms method ce trains (the top-m baseline, form none, is method top-m).
CE_FORMS = tuple(name for name in FORMS if name != TOP_M)
#: all: everything (the paper); ce+router: compressed experts and routers; ce: compressed experts only.
TRAINABLE = ("all", "ce+router", "ce")
#: auto: bf16-mixed where the GPU supports bfloat16, else fp32. bf16-mixed: float32 weights,
#: bfloat16 autocast. bf16: bfloat16 weights (compressed experts kept in float32, where
#: updates of 2e-5 on 1.0 are not rounded away). fp32: float32 throughout.
PRECISIONS = ("auto", "bf16-mixed", "bf16", "fp32")
CONFIG_FILE = "training_config.json"
#: Settings that may differ between a run and its resumption (everything else must match).
_RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "out"})


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. Defaults are the paper's (lr 2e-5, cosine, 3% warm-up, 2 epochs,
    AdamW, bf16 where the hardware has it, gradient checkpointing, packed sequences)."""

    model: str = setting(help="Model directory, hub id, bundled, or tiny:<family>.")
    data: str = setting(help="Hugging Face dataset name, or a local .json/.jsonl/.parquet file.")
    out: str = setting(help="Run directory: checkpoints, log, and the final model.")
    method: str = setting("ce", "full (all top-k experts), top-m (top k - n_ce only) or ce.")
    n_ce: int | None = setting(None, "Experts per token replaced; default the checkpoint's, else half the top-k.")
    form: str | None = setting(None, f"Method ce: {', '.join(CE_FORMS)}; default the checkpoint's, else {FORMS[0]}.")
    r: int | None = setting(
        None, "Neurons per auxiliary expert (subset, slim); default the checkpoint's, else an eighth of the expert's."
    )
    top_p: float | None = setting(None, CEConfig.__dataclass_fields__["top_p"].metadata["help"])
    skip_below: float | None = setting(None, CEConfig.__dataclass_fields__["skip_below"].metadata["help"])
    distill_weight: float = setting(
        0.0, "Weight of a term pulling each converted block towards the full top-k block's output."
    )
    trainable: str = setting("all", "all (the paper), ce+router, or ce (the compressed experts only).")
    lr: float = setting(2e-5, "Peak learning rate (cosine schedule).")
    ce_lr: float | None = setting(
        None, "Learning rate of the compressed experts; default lr (a larger one moves them faster)."
    )
    epochs: float = setting(2.0, "Passes over the data (ignored with max_steps).")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.")
    seq_len: int | None = setting(None, "Tokens per sequence; default min(2048, the model's limit).")
    batch_size: int = setting(8, "Sequences per device per step.")
    grad_accum: int = setting(1, "Gradient accumulation steps.")
    warmup: float = setting(0.03, "Warm-up, as a fraction of the steps.")
    weight_decay: float = setting(0.0, "AdamW weight decay (never on the compressed experts, norms or biases).")
    seed: int = setting(0, "Seed of the weights' noise, data order and dropout.")
    precision: str = setting("auto", "auto, bf16-mixed, bf16 (bfloat16 weights, float32 compressed experts) or fp32.")
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass.")
    packing: bool = setting(True, "Concatenate examples into full-length sequences.")
    response_only: bool = setting(False, "Loss on response tokens only.")
    prompt: str = setting("alpaca", "alpaca (the paper's template) or chat (the tokenizer's chat template).")
    split: str = setting("train", "Split of a hub dataset.")
    limit: int | None = setting(None, "Use only the first N records.")
    tokenizer: str | None = setting(None, "Tokenizer source, if not the model's.")
    save_steps: float = setting(0.1, "Checkpoint every N steps (below 1: a fraction of the run).")
    keep_checkpoints: bool = setting(False, "Keep checkpoints/ after the run ends.")
    logging_steps: int = setting(10, "Log the loss every N steps.")
    resume: bool = setting(False, "Continue the interrupted run in out from its last checkpoint.")
    overwrite: bool = setting(False, "Replace the run in out.")

    def __post_init__(self) -> None:
        def fail(message: str, *settings: str) -> NoReturn:
            raise CompressedExpertsError(message, settings=settings)

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                fail(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}", name)

        one_of("method", METHODS)
        one_of("trainable", TRAINABLE)
        one_of("precision", PRECISIONS)
        one_of("prompt", PROMPT_FORMATS)
        # Every number is finite: inf passes "positive", and inf x a warm-up's 0 is a NaN learning rate.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"{f.name} must be a finite number, got {value}", f.name)
        for name in ("lr", "epochs", "save_steps"):
            if not getattr(self, name) > 0:
                fail(f"{name} must be positive, got {getattr(self, name)}", name)
        if self.ce_lr is not None and not self.ce_lr > 0:
            fail(f"ce_lr must be positive, got {self.ce_lr}", "ce_lr")
        if not self.weight_decay >= 0:
            fail(f"weight_decay must be 0 or more, got {self.weight_decay}", "weight_decay")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                fail(f"{name} must be at least 1, got {getattr(self, name)}", name)
        for name in ("max_steps", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"{name} must be at least 1, got {getattr(self, name)}", name)
        if self.seq_len is not None and self.seq_len < 2:  # it trained on nothing and reported a NaN loss
            fail(
                f"seq_len must be at least 2 (a sequence of one token has no next token to learn), got {self.seq_len}",
                "seq_len",
            )
        if self.save_steps > 1 and self.save_steps != int(self.save_steps):
            fail(
                f"save_steps is a whole number of steps, or a fraction of the run below 1; got {self.save_steps}",
                "save_steps",
            )
        if not 0 <= self.warmup < 1:
            fail(f"warmup is a fraction of the steps, in [0, 1); got {self.warmup}", "warmup")
        if self.resume and self.overwrite:
            fail("resume continues the run in out and overwrite deletes it: choose one", "resume", "out", "overwrite")
        rule = rule_of(self)
        if self.method == "full":
            compressing = {name: value for name, value in rule.items() if name != "n_ce" or value}  # n_ce=0 is full
            if compressing:
                name, value = next(iter(compressing.items()))
                fail(
                    f"method full runs all top-k experts; {name}={value} makes no sense with it (leave {name} out)",
                    "method",
                    name,
                )
            if self.trainable != "all":
                fail(
                    f"method full has no compressed experts to train; trainable {self.trainable} needs method ce",
                    "method",
                    "trainable",
                )
        else:
            if rule:
                CEConfig(**rule)  # exactly one rule, in range
                if self.n_ce == 0:
                    fail(f"n_ce=0 with method {self.method} is full top-k: use method full", "n_ce", "method")
            if self.method == "top-m" and self.trainable != "all":
                fail(
                    f"method top-m has no compressed experts; trainable {self.trainable} needs method ce",
                    "method",
                    "trainable",
                )
        if self.ce_lr is not None and self.method != "ce":
            fail(f"ce_lr sets the compressed experts' learning rate; method {self.method} has none", "ce_lr", "method")
        if (self.form is not None or self.r is not None) and self.method != "ce":
            fail(f"form and r choose the compressed experts of method ce, not {self.method}", "form", "r", "method")
        if self.form is not None:
            if self.form not in CE_FORMS:
                fail(
                    f"form must be one of {', '.join(CE_FORMS)} (none is method top-m), not {self.form!r}",
                    "form",
                    "method",
                )
            CEConfig(1, self.form, self.r)  # r only with subset or slim, a whole number
        if not self.distill_weight >= 0:
            fail(f"distill_weight must be 0 or more, got {self.distill_weight}", "distill_weight")
        if self.distill_weight and self.method == "full":
            fail(
                "distill_weight pulls converted blocks towards full top-k; method full has none",
                "distill_weight",
                "method",
            )

    def ce_config(self, top_k: int, existing: Settings | None = None) -> Settings | None:
        """The conversion this run trains (None for full top-k), given the model's top-k and the
        compressed experts the checkpoint already has (whose settings fill what was left out; a
        checkpoint with settings per block, a plan, trains with its own)."""
        if self.method == "full":
            return None
        if isinstance(existing, tuple):
            given = [name for name in (*RULES, "form", "r") if getattr(self, name, None) is not None]
            if given or self.method == "top-m":
                raise CompressedExpertsError(
                    f"the model has settings of its own per MoE block (a plan): it trains with them; leave "
                    f"{', '.join(given) or 'method top-m'} out (or plan the original model again)",
                    settings=tuple(given) or ("method",),
                )
            return existing
        rule = rule_of(self) or (rule_of(existing) if existing is not None else {"n_ce": top_k // 2})
        if rule.get("n_ce") == 0:
            raise CompressedExpertsError(
                f"the model routes to top-{top_k}: there is no expert to compress; use method full",
                settings=("method",),
            )
        if self.method == "top-m":
            return CEConfig(form=TOP_M, **rule)
        form = self.form or (existing.form if existing is not None and existing.form != TOP_M else FORMS[0])
        r = self.r if self.r is not None else existing.r if existing is not None and existing.form == form else None
        wanted = CEConfig(form=form, r=r, **rule)
        if not get_form(form).parameters and self.trainable == "ce":
            raise CompressedExpertsError(
                f"form {form} adds no parameters, so trainable ce has nothing to train; use trainable all or ce+router",
                settings=("form", "trainable"),
            )
        return wanted

    def to_json(self, **extra) -> str:
        """The settings as stored in training_config.json, with ``extra`` sections (e.g. ``resolved``)."""
        return json.dumps({**asdict(self), **extra}, indent=2)

    @classmethod
    def read(cls, directory: Path) -> TrainConfig:
        """The settings a run in ``directory`` was started with."""
        try:
            saved = json.loads((directory / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CompressedExpertsError(f"{directory / CONFIG_FILE} cannot be read: {err}") from err
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def differences(self, other: TrainConfig) -> list[str]:
        """Settings that differ from ``other``, apart from those a resumption may change."""
        mine, theirs = asdict(self), asdict(other)
        return [
            f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if k not in _RESUMABLE_CHANGES and mine[k] != theirs[k]
        ]
