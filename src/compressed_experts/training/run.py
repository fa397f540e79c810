"""One fine-tuning run, from a :class:`TrainConfig` to a directory that ``from_pretrained`` loads.

Everything that can be wrong with the settings, the output directory, the model's structure
or the data is checked before the model's weights are read and before any step runs.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import PreTrainedModel

from ..architectures import family_of
from ..checkpoint import (
    MODEL_MARKERS,
    check_output_dir,
    commit_staged,
    from_pretrained,
    load_tokenizer,
    save_compressed_experts,
    skeleton,
    staging_dir,
    write_atomic,
)
from ..config import CEConfig
from ..convert import ce_config_of, convert, float32_compressed_experts, swap_blocks
from ..errors import CompressedExpertsError
from ..layer import is_compressed_expert, pruned_error
from ..parameters import active_parameters
from ..text import load_records
from .config import CONFIG_FILE, TrainConfig
from .data import build_dataset, data_fingerprint, tokenizer_fingerprint
from .trainer import (
    DAMAGED_PREFIX,
    CETrainer,
    ProgressAndLog,
    StopOnNonFinite,
    latest_good_checkpoint,
    read_run_state,
)

LOG_FILE = "training_log.jsonl"
SUMMARY_FILE = "training_summary.json"
CE_FILE = "compressed_experts.safetensors"
CHECKPOINTS = "checkpoints"
_DEFAULT_SEQ_LEN = 2048


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output(config: TrainConfig) -> tuple[Path | None, list[tuple[Path, str]], bool]:
    """Check ``config.out`` for this run: (the checkpoint to resume from, the newer ones that are
    damaged and skipped, each with what is wrong, whether ``out`` must be emptied first). Nothing
    is deleted or moved here: ``--overwrite`` clears the directory, and damaged checkpoints are
    set aside, only once every other check has passed, just before the first write.

    Under DDP only the main process checks: the others would find the files it starts writing.
    """
    out = Path(config.out)
    if not _is_main_process():
        return (*(latest_good_checkpoint(out / CHECKPOINTS) if config.resume else (None, [])), False)
    # Where a run may go, and what --overwrite may replace, is the library's one output policy.
    sources = {"model": config.model, "data": config.data, "tokenizer": config.tokenizer}
    clear = check_output_dir(
        out,
        overwrite=config.overwrite,
        sources=sources,
        replaces="a run or a model",
        markers=(CONFIG_FILE, *MODEL_MARKERS),
        keep=config.resume,
        resumable=True,
    )
    if config.resume:
        if not (out / CONFIG_FILE).is_file():
            raise CompressedExpertsError(
                f"resume: {out} holds no run to continue (no {CONFIG_FILE})", settings=("resume",)
            )
        if (out / SUMMARY_FILE).is_file():
            raise CompressedExpertsError(f"resume: the run in {out} has already finished", settings=("resume",))
        changed = config.differences(TrainConfig.read(out))
        if changed:
            names = tuple(change.split(":", 1)[0] for change in changed)  # "lr: 0.003 -> 0.001"
            raise CompressedExpertsError(
                f"resume with other settings than the run in {out}: {'; '.join(changed)}", settings=("resume", *names)
            )
        last, damaged = latest_good_checkpoint(out / CHECKPOINTS)
        if last is None:
            why = "".join(f"; {c.name}: {problem}" for c, problem in damaged)
            raise CompressedExpertsError(
                f"resume: the run in {out} has no checkpoint to continue from"
                f"{' (every one is damaged' + why + ')' if damaged else ' (it wrote none yet)'}; "
                f"start it again with overwrite",
                settings=("resume", "overwrite"),
            )
        return last, damaged, False
    return None, [], clear


def _check_same_run(out: Path, fingerprints: dict[str, str], resolved: dict[str, Any]) -> None:
    """Resume only the same run: the data's content and the tokenizer (not just their names, which
    the settings compare) and the settings as resolved here (precision auto, seq_len default...)
    must be those the run started with. Runs started before fingerprints were kept pass."""
    saved = json.loads((out / CONFIG_FILE).read_text())
    changed = [
        f"the {name}'s content changed since the run started ({saved['fingerprints'][name]} -> {value})"
        for name, value in fingerprints.items()
        if saved.get("fingerprints", {}).get(name, value) != value
    ]
    changed += [
        f"{name} resolves to {value!r} here, {saved['resolved'][name]!r} when the run started"
        for name, value in resolved.items()
        if saved.get("resolved", {}).get(name, value) != value
    ]
    if changed:
        raise CompressedExpertsError(
            f"resume: not the same run as in {out}: {'; '.join(changed)}. Restore what changed, "
            f"or start a new run (another out, or overwrite)",
            settings=("resume", *(name for name in ("data", "tokenizer") if name in " ".join(changed))),
        )


def _precision(name: str) -> str:
    if name != "auto":
        return name
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _check_structure(config: TrainConfig) -> tuple[Any, int]:
    """The conversion and sequence length this run uses, from the model's config alone."""
    shape = skeleton(config.model)  # the meta-device structure: no weights are read
    family_of(shape)  # a dense or unsupported model is refused here, naming the supported families
    model_config, existing = shape.config, ce_config_of(shape)
    wanted = config.ce_config(model_config.num_experts_per_tok, existing)
    if existing is None and wanted is not None:
        # Converting the weightless skeleton checks n_ce against the top-k and r against the
        # experts, as the real conversion will, and spells out the default r.
        swap_blocks(shape, wanted)
        wanted = ce_config_of(shape)
    pruned = [c for c in (existing if isinstance(existing, tuple) else (existing,)) if c and c.kept_experts]
    if pruned and config.distill_weight:  # a saved model pruned with stand-ins holds its kept experts only
        raise pruned_error(pruned[0])
    if existing is not None and existing != wanted:
        held = (
            "settings per MoE block"
            if isinstance(existing, tuple)
            else f"{existing.rule}, form={existing.form}" + (f", r={existing.r}" if existing.r is not None else "")
        )
        raise CompressedExpertsError(
            f"{config.model} already has compressed experts ({held}); "
            f"method {config.method} needs {'the original model' if wanted is None else wanted}",
            settings=("method",),
        )
    limit = getattr(model_config, "max_position_embeddings", None)
    seq_len = config.seq_len or min(_DEFAULT_SEQ_LEN, limit or _DEFAULT_SEQ_LEN)
    if limit is not None and seq_len > limit:
        raise CompressedExpertsError(
            f"seq_len {seq_len} is longer than the model takes ({limit} positions)", settings=("seq_len",)
        )
    return wanted, seq_len


def _refuse_unsharded_fsdp(distributed_type: DistributedType) -> None:
    """accelerate builds its FSDP plugin for accelerators only: on CPU processes an FSDP config would
    run plain data parallel, every process holding the whole model, without a word. Refused before
    any weight is read or any earlier run is replaced."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
    ):
        raise CompressedExpertsError(
            "the accelerate config asks for FSDP, but accelerate shards only on GPUs (and other accelerators): "
            "here it would run plain data parallel. Drop the FSDP config, or shard a training loop of your own "
            "with compressed_experts.training.sharding"
        )


def _set_trainable(model, trainable: str, router_attr: str) -> None:
    for name, param in model.named_parameters():
        if trainable == "all":
            param.requires_grad_(True)
        elif trainable == "ce":
            param.requires_grad_(is_compressed_expert(name))
        else:
            param.requires_grad_(is_compressed_expert(name) or f".{router_attr}." in name)


@dataclass
class TrainResult:
    model: PreTrainedModel  # the trained model, as saved
    summary: dict[str, Any]  # steps, tokens, time, final loss, active parameters... (training_summary.json)


def _check_vocabulary(config: TrainConfig, tokenizer) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings, before any data is read
    (its ids failed with an IndexError in the first step): reads the model's config, not its weights."""
    vocab = skeleton(config.model).get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise CompressedExpertsError(
            f"the tokenizer {config.tokenizer or config.model} has {len(tokenizer)} tokens but the model "
            f"{config.model} only {vocab} embeddings: use the tokenizer the model was trained with",
            settings=("tokenizer",),
        )


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` with ``config.method``.

    The result in ``config.out``: the model (``compressed_experts.from_pretrained`` loads it),
    its tokenizer, ``training_config.json``, ``training_log.jsonl``, ``training_summary.json``
    and, for ``trainable="ce"``, ``compressed_experts.safetensors`` (the vectors alone, to apply
    to the base model with :func:`compressed_experts.apply_compressed_experts`).
    """
    from transformers import DataCollatorForSeq2Seq, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    resume_from, damaged, clear = prepare_output(config)
    wanted, seq_len = _check_structure(config)
    precision = _precision(config.precision)
    if precision in ("bf16", "bf16-mixed") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise CompressedExpertsError("this GPU has no bfloat16: use precision fp32", settings=("precision",))
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    _check_vocabulary(config, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = load_records(config.data, config.split, config.limit)
    fingerprints = {"data": data_fingerprint(config.data, records), "tokenizer": tokenizer_fingerprint(tokenizer)}
    dataset = build_dataset(records, tokenizer, seq_len, config.prompt, config.packing, config.response_only)
    out = Path(config.out)
    try:
        args = TrainingArguments(
            output_dir=str(out / CHECKPOINTS),
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps or -1,
            lr_scheduler_type="cosine",
            warmup_steps=config.warmup,
            bf16=precision == "bf16-mixed",
            activation_checkpointing=config.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
            logging_steps=config.logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=config.save_steps,
            seed=config.seed,
            report_to="none",
            disable_tqdm=True,  # our own bar shows loss and tokens/s
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",
            use_cpu=not torch.cuda.is_available(),
            ddp_find_unused_parameters=False,
        )
    except ValueError as err:  # a combination transformers refuses: said before any weight is read
        raise CompressedExpertsError(f"these training settings do not work together: {err}") from err
    _refuse_unsharded_fsdp(args.distributed_state.distributed_type)
    # A checkpoint planned per block trains with its own settings: recorded block by block.
    one = wanted if isinstance(wanted, CEConfig) else None
    resolved = {
        **({"plan": [c.to_dict() for c in wanted]} if isinstance(wanted, tuple) else {}),
        "n_ce": one.n_ce if one is not None else None if wanted is not None else 0,
        "top_p": one.top_p if one is not None else None,
        "skip_below": one.skip_below if one is not None else None,
        "form": one.form if one is not None else None,
        "r": one.r if one is not None else None,
        "seq_len": seq_len,
        "precision": precision,
        "world_size": args.world_size,
    }
    if resume_from is not None and _is_main_process():
        _check_same_run(out, fingerprints, resolved)

    model = from_pretrained(config.model, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    if wanted is not None and ce_config_of(model) is None:
        convert(model, wanted)
    if precision == "bf16":  # float32 master copies for the vectors; the layer casts them per call
        float32_compressed_experts(model)
    _set_trainable(model, config.trainable, family_of(model).router_attr)
    model.config.use_cache = False

    if _is_main_process():
        if clear:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            write_atomic(out / CONFIG_FILE, config.to_json(resolved=resolved, fingerprints=fingerprints))
        else:
            for checkpoint, problem in damaged:  # set aside, not deleted: there may be something to learn from it
                aside = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(checkpoint, aside)
                warnings.warn(
                    f"{checkpoint} is damaged ({problem}): set aside as {aside.name}; resuming from "
                    f"{resume_from.name}, the newest good checkpoint",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _truncate_log(out / LOG_FILE, _checkpoint_step(resume_from))
    collator = default_data_collator if config.packing else DataCollatorForSeq2Seq(tokenizer, padding=True)
    trainer = CETrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[ProgressAndLog(out / LOG_FILE), StopOnNonFinite()],
        ce_lr=config.ce_lr,
        distill_weight=config.distill_weight,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the bar and the log file say it better
    # The summary is the whole run's: the loss and time of the steps before the checkpoint are in it.
    before = read_run_state(resume_from) if resume_from is not None else {"step": 0, "loss_sum": 0.0, "seconds": 0.0}
    if before is not None:
        trainer.before = {"loss_sum": before["loss_sum"], "seconds": before["seconds"]}
    start_step = _checkpoint_step(resume_from) if resume_from is not None else 0
    saved_state = json.loads((resume_from / "trainer_state.json").read_text()) if resume_from else {}
    if saved_state and saved_state["global_step"] >= saved_state["max_steps"]:
        # Killed during the final save: every step is done and checkpointed. Running the Trainer
        # would take one step more; the final model is the last checkpoint's.
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        part_loss = 0.0
    else:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        part_loss = result.training_loss * (trainer.state.global_step - start_step)
    totals = trainer.run_totals()
    if before is None:  # a checkpoint from before run_state.json: the loss of the resumed part only
        train_loss = part_loss / max(trainer.state.global_step - start_step, 1)
    else:
        train_loss = (before["loss_sum"] + part_loss) / max(trainer.state.global_step, 1)

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # A per-token rule runs as many experts as the text asks for: counted on the run's first sequences.
    plan = wanted if isinstance(wanted, tuple) else ()
    dynamic = wanted is not None and any(c.dynamic for c in plan or (wanted,))
    counts = active_parameters(model, dataset[:8]["input_ids"] if dynamic else None)
    summary = {
        "method": config.method,
        **({"plan": [c.to_dict() for c in plan]} if plan else {}),
        "n_ce": resolved["n_ce"],
        "rule": "per block (a plan)" if plan else wanted.rule if wanted is not None else "full top-k",
        "main_experts_per_token": counts["main_experts_per_token"],
        "form": resolved["form"],
        "r": resolved["r"],
        "distill_weight": config.distill_weight,
        "trainable": config.trainable,
        "steps": trainer.state.global_step,
        "tokens": int(trainer.state.num_input_tokens_seen),
        "seconds": totals["seconds"],
        "final_loss": losses[-1] if losses else None,
        "train_loss": train_loss,
        "active_parameters": counts["active"],
        "active_full_topk": counts["active_full_topk"],
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "sequences": len(dataset),
        "seq_len": seq_len,
        "precision": precision,
        "world_size": trainer.args.world_size,
        "global_batch": config.batch_size * config.grad_accum * trainer.args.world_size,
        "distributed": trainer.accelerator.distributed_type.value,
        "resumed_from": str(resume_from) if resume_from else None,
        "damaged_checkpoints": {f"{DAMAGED_PREFIX}{c.name}": problem for c, problem in damaged},
    }
    _save_final(trainer, out, config, summary)
    return TrainResult(trainer.accelerator.unwrap_model(trainer.model), summary)


def _save_final(trainer, out: Path, config: TrainConfig, summary: dict[str, Any]) -> None:
    """Model, tokenizer and summary into ``out``: staged (:func:`compressed_experts.checkpoint.staging_dir`)
    by the Trainer's own ``save_model`` (called on every process: it gathers sharded weights under
    FSDP or DeepSpeed), then moved into the run directory by the main process."""
    trainer.check_finite_weights("the final model")  # every process: a collective under FSDP and DDP
    staging = staging_dir(out)
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True
    trainer.save_model(str(staging))
    if config.trainable == "ce":  # every process: sharded (FSDP2) vectors are gathered; the first writes
        save_compressed_experts(model, staging / CE_FILE)
    if trainer.is_world_process_zero():  # save_model wrote the tokenizer too (the Trainer's processing_class)
        commit_staged(staging, out, merge=True)  # beside the run's log and settings
        write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2))  # last: its presence means "finished"
        if not config.keep_checkpoints:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def _truncate_log(log: Path, step: int) -> None:
    """Drop log entries past the checkpoint a run resumes from: those steps run again."""
    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        write_atomic(log, "".join(line + "\n" for line in kept))
