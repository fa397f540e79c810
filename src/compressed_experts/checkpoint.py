"""Loading compressed-experts checkpoints (and plain MoE checkpoints) back, and saving them safely.

After :func:`convert`, the model's own ``save_pretrained`` writes safetensors in transformers'
hub layout plus a config.json whose ``model_type`` is ``compressed_experts`` and whose
``compressed_experts`` section names the family and ``n_ce``. Loading goes through
transformers' own loader (which fuses per-expert weights back), with the model converted
before the weights arrive so the loader fills the compressed experts too.

Every command that writes a model or a run into a directory goes through the same two steps
here: :func:`check_output_dir` (what ``out`` may be, and what ``overwrite`` may replace), then a
staged save (:func:`save_model`, or :func:`staged_save` / :func:`commit_staged` for writers that
save in their own way): everything is written beside ``out`` first and moved into place at the
end, so a failed or interrupted save never leaves half a model there.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import os
import shutil
import struct
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .adapters import base_of, named_weights
from .auto_classes import current_key, loader_class, register, split_saved
from .config import (
    SAVED_MODEL_TYPE,
    CEConfig,
    Settings,
    mark_config,
    read_plan_file,
    settings_from_dict,
    settings_to_dict,
)
from .convert import ce_config_of, check_plan_fits, convert, swap_blocks
from .errors import CheckpointError, CompressedExpertsError, first_line
from .forms import REGISTRY
from .layer import is_compressed_expert
from .routing import RULES
from .sources import TINY_PREFIX, is_hub_id, local_dir, local_path, resolve, tiny_family
from .tiny import tiny_model, tiny_tokenizer

__all__ = [  # TINY_PREFIX is re-exported: callers used to find it here
    "TINY_PREFIX",
    "apply_compressed_experts",
    "check_output_dir",
    "commit_staged",
    "from_pretrained",
    "load_tokenizer",
    "save_compressed_experts",
    "save_model",
    "skeleton",
    "staged_save",
    "staging_dir",
    "tokenizer_if_any",
    "write_atomic",
]

#: Keyword arguments of ``from_pretrained`` that also matter for finding config.json.
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download")


# AutoConfig / AutoModelForCausalLM (and AutoTokenizer, which reads config.json) know saved
# directories once this package is imported.
register()


def _adapter_config(path: Path) -> dict[str, Any] | None:
    """The adapter_config.json of a PEFT adapter directory (one with no config.json), else None."""
    if not (path.is_dir() and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file()):
        return None
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/adapter_config.json is not readable JSON: {first_line(err)}") from err
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{path} is a PEFT adapter that names no base model (base_model_name_or_path)")
    return config


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """The compressed experts an adapter holds (PEFT's ``modules_to_save``), by their names in the model."""
    from safetensors.torch import load_file

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        return {}
    try:
        weights = load_file(os.fspath(file))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {file}: {first_line(err)}") from err
    return {current_key(k.removeprefix("base_model.model.")): v for k, v in weights.items() if is_compressed_expert(k)}


def _form_held(held: Mapping[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """The form (and ``r``) whose parameters an adapter holds, judged by their names and shapes."""
    names = {k.rsplit(".", 1)[-1] for k in held}
    form = next((name for name, spec in REGISTRY.items() if spec.parameters and set(spec.parameters) == names), None)
    r = next((int(v.shape[-1]) for k, v in held.items() if k.endswith(".ce_down_proj")), None)
    return form, r


def _load_adapter(path: Path, config: dict[str, Any], asked: dict[str, Any], kwargs: dict[str, Any]):
    """A PEFT adapter on the model it names as its base, converted as the adapter was trained
    (``asked``: the compressed-experts settings the caller gave, see :func:`_requested`)."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise CheckpointError(f"{path} is a PEFT adapter: install peft (pip install peft) to load it") from err
    held = _adapter_weights(path)
    base_source = config["base_model_name_or_path"]
    if held and _requested(asked) is not None and asked["form"] is None:
        form, held_r = _form_held(held)
        asked = {**asked, "form": form, "r": asked["r"] if asked["r"] is not None else held_r}
    base = from_pretrained(base_source, **asked, **kwargs)
    if held and ce_config_of(base) is None:
        raise CheckpointError(
            f"{path} holds compressed experts but names the plain model {base_source} as its base (the model "
            f"was converted in memory before PEFT training): give the n_ce (or top_p, skip_below) it was trained "
            f"with, e.g. from_pretrained({str(path)!r}, n_ce=4)",
            settings=("n_ce",),
        )

    def mismatch(weights: Mapping[str, torch.Tensor], values: bool = False) -> list[str]:
        wanted = {n: p for n, p in weights.items() if is_compressed_expert(n)}
        names = sorted(set(wanted) ^ set(held)) if held else []
        return names or [
            n
            for n, v in held.items()
            if tuple(wanted[n].shape) != tuple(v.shape)
            or (values and not torch.equal(wanted[n].detach().cpu(), v.to(wanted[n].dtype)))
        ]

    wrong = mismatch(dict(named_weights(base)))
    if not wrong:
        model = PeftModel.from_pretrained(base, os.fspath(path))
        wrong = mismatch(dict(named_weights(model)), values=True)  # PEFT skips what it cannot place, silently
    if wrong:
        raise CheckpointError(
            f"{path} holds compressed experts that do not fit {base_source} as loaded "
            f"({ce_config_of(base)}; first mismatch: {wrong[0]}): give the rule (n_ce, top_p or skip_below), "
            f"form and r it was trained with",
            settings=(*RULES, "form", "r"),
        )
    return model.eval()


def _read_config(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    path = Path(source, kwargs.get("subfolder") or "")  # as local_dir sees it
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{source} is a file; give the model's directory (or a hub id)")
    adapter = _adapter_config(path)
    if adapter is not None:
        raise CheckpointError(
            f"{path} is a PEFT adapter, not a model: give the model it was trained on "
            f"({adapter['base_model_name_or_path']}), or load the adapter with from_pretrained"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a model directory: it has no config.json "
            f"(expected a directory written by save_pretrained, or a hub id)"
        )
    # Hub ids of MoE models are "org/name"; anything else that does not exist is a mistyped folder.
    if not path.exists() and not is_hub_id(source):
        raise CheckpointError(f"no such model directory: {source} (and it is not a hub id of the form org/name)")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the config of {source!r}: {first_line(err)}") from err
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("model_type"), str):
        raise CheckpointError(f"{source}: config.json is not a transformers model config (no model_type)")
    return config_dict


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking that the file holds all the bytes it names."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is truncated or not a safetensors file: re-save or re-download it")
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise CheckpointError(
                f"{file} is truncated or corrupt (header runs past the end): re-save or re-download it"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file} has a corrupt header ({err}): re-save or re-download it") from err
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        shapes = {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{file} has a corrupt header: re-save or re-download it") from err
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise CheckpointError(
            f"{file} is truncated or corrupt: its header describes {expected} bytes, the file has {size}; "
            f"re-save or re-download it"
        )
    return shapes


def _local_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a local checkpoint's safetensors files (integrity-checked), by tensor name.

    A sharded checkpoint is read through its index, so that a missing shard is named and a
    stray file beside the shards is not counted.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({directory / name for name in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is corrupt: re-save or re-download the checkpoint") from err
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{directory} lacks shard(s) {', '.join(missing)} named in its index")
    else:
        files = sorted(directory.glob("*.safetensors"))
    shapes = {}
    for file in files:
        shapes.update(_safetensors_shapes(file))
    return shapes


def _check_compressed_shapes(saved: dict[str, tuple[int, ...]], expected_model: PreTrainedModel) -> None:
    """Compare the checkpoint's compressed experts with those its config implies, before loading."""

    # Compare by (kind, shape): on save, some families rename module paths (Mixtral's
    # ".mlp." becomes ".block_sparse_moe."), so in-memory and saved names differ.
    def kinds(items) -> Counter:
        return Counter((k.rsplit(".", 1)[-1], tuple(shape)) for k, shape in items if is_compressed_expert(k))

    expected = kinds((k, v.shape) for k, v in expected_model.state_dict().items())
    found = kinds(saved.items())
    blocks_expected = max(expected.values(), default=0)  # every block has one tensor of each kind
    blocks_found = max(found.values(), default=0)
    if blocks_found != blocks_expected:
        raise CheckpointError(
            f"the checkpoint has compressed experts for {blocks_found} MoE blocks but its config describes "
            f"{blocks_expected}: the weights and config.json do not belong together"
        )
    if found == expected:
        return
    wanted = {kind: list(shape) for kind, shape in expected}  # each kind has one shape in every block
    by_block: dict[str, dict[str, list[int]]] = {}
    for key, shape in saved.items():
        if is_compressed_expert(key):
            block, kind = key.rsplit(".", 1)
            by_block.setdefault(block, {})[kind] = list(shape)
    for block, held in sorted(by_block.items()):
        held_form, _ = _form_held({k: torch.empty(0) for k in held})
        if held_form is not None and set(held) != set(wanted):
            raise CheckpointError(
                f"the checkpoint holds compressed experts of form {held_form} ({', '.join(sorted(held))}) but "
                f"config.json describes another form: the weights and config.json do not belong together"
            )
        for kind, shape in sorted(wanted.items()):
            if kind not in held:
                raise CheckpointError(
                    f"the checkpoint lacks {block}.{kind} (config.json implies {kind} {shape} in every MoE "
                    f"block): re-save or re-download it"
                )
            if held[kind] != shape:
                raise CheckpointError(
                    f"{block}.{kind} has shape {held[kind]} in the checkpoint but config.json implies {shape}: "
                    f"the weights and config.json do not belong together"
                )
        extra = sorted(set(held) - set(wanted))
        if extra:
            raise CheckpointError(
                f"the checkpoint holds {block}.{extra[0]}, which the form in config.json does not have: "
                f"the weights and config.json do not belong together"
            )
    raise CheckpointError("compressed-expert shapes disagree with config.json")  # not reached: a block differs


def _plain_config(source: str, model_type: Any, fields: dict[str, Any], what: str) -> PretrainedConfig:
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: {what} {model_type!r} ({first_line(err)})") from err


def _asked(
    n_ce: int | None, form: str | None, r: int | None, top_p: float | None, skip_below: float | None
) -> dict[str, Any]:
    """The compressed-experts settings a loader was given, by name (None: not given; never
    ``kept_experts``, which only a checkpoint pruned with stand-ins holds)."""
    return {"n_ce": n_ce, "top_p": top_p, "skip_below": skip_below, "form": form, "r": r}


def _requested(asked: dict[str, Any]) -> CEConfig | None:
    """The conversion a caller asked for (validated before any download or load), or None when it
    gave no rule (n_ce, top_p or skip_below).

    ``form`` alone is only a check against a converted checkpoint; see :func:`_resolve`.
    """
    form, r = asked["form"], asked["r"]
    if all(asked.get(name) is None for name in RULES):
        if form is not None:
            CEConfig(0, form, r)  # raises the error that lists the forms, or says r does not apply
        return None
    return CEConfig(form="ia3" if form is None else form, r=r, **{name: asked.get(name) for name in RULES})


def _check_plan_alone(plan, asked: dict[str, Any]) -> None:
    """Refuse settings given beside a plan: it says every block's."""
    given = [name for name, value in asked.items() if value is not None]
    if given:
        raise CompressedExpertsError(
            f"a plan ({plan}) sets every block's n_ce, form and r: leave {', '.join(given)} out",
            settings=(*given, "plan"),
        )


def _fitting_plan(plan, shape: PreTrainedModel, source: str) -> tuple[CEConfig, ...]:
    """The plan's settings, refused unless ``shape`` (``source``'s skeleton) is a plain model it was made for."""
    if ce_config_of(shape) is not None:
        raise CompressedExpertsError(
            f"{source} already has compressed experts: a plan applies to the original model it was made for",
            settings=("plan",),
        )
    return check_plan_fits(read_plan_file(plan), shape)


def _needs_n_ce(asked: dict[str, Any]) -> None:
    form, r = asked["form"], asked["r"]
    if form is not None or r is not None:
        name, value = ("form", form) if form is not None else ("r", r)
        raise CompressedExpertsError(
            f"{name}={value} needs n_ce to convert a plain model: say how many experts per token it replaces "
            f"(or give a per-token rule, top_p or skip_below)",
            settings=(name, "n_ce"),
        )


def _resolve(
    source: str, config_dict: dict[str, Any], asked: dict[str, Any]
) -> tuple[PretrainedConfig, Settings | None]:
    """The plain transformers config of a checkpoint and its compressed-experts settings, if any.

    For a converted checkpoint, the settings in ``asked`` may be left out or repeat what it holds.
    """
    requested = _requested(asked)
    if config_dict.get("model_type") != SAVED_MODEL_TYPE:
        if requested is None:
            _needs_n_ce(asked)
        fields = {k: v for k, v in config_dict.items() if k != "model_type"}
        return _plain_config(
            source, config_dict.get("model_type"), fields, "transformers does not know model type"
        ), requested
    try:
        base_type, fields, ce = split_saved(config_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    if not isinstance(ce, CEConfig):  # settings per block (a plan)
        given = [key for key, value in asked.items() if value is not None]
        if given:
            raise CompressedExpertsError(
                f"{source} already has compressed experts, with settings per MoE block (a plan); got "
                f"{', '.join(given)}: leave them out, or convert the original model again",
                settings=tuple(given),
            )
        return _plain_config(source, base_type, fields, "unknown base model type"), ce
    if any(value is not None and value != getattr(ce, key) for key, value in asked.items()):
        held = ", ".join(
            f"{key}={getattr(ce, key)}" for key in (*asked, "kept_experts") if getattr(ce, key) is not None
        )
        given = ", ".join(f"{key}={value}" for key, value in asked.items() if value is not None)
        raise CompressedExpertsError(
            f"{source} already has compressed experts with {held}; got {given}. "
            f"Leave them out, or convert the original model again",
            settings=tuple(key for key in asked if asked[key] is not None or getattr(ce, key) is not None),
        )
    return _plain_config(source, base_type, fields, "unknown base model type"), ce


def _causal_lm_class(source: str, config: PretrainedConfig) -> type[PreTrainedModel]:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as err:
        raise CheckpointError(f"{source}: {type(config).__name__} has no causal-LM model class") from err


def _skeleton(model_cls: type[PreTrainedModel], config: PretrainedConfig, ce: Settings | None) -> PreTrainedModel:
    """The model's structure on the meta device: shapes and parameter counts without weights."""
    with torch.device("meta"):
        model = model_cls(copy.deepcopy(config))
    if ce is not None:
        swap_blocks(model, ce, saved=True)
    return model


def skeleton(
    source: str | os.PathLike,
    n_ce: int | None = None,
    form: str | None = None,
    r: int | None = None,
    *,
    top_p: float | None = None,
    skip_below: float | None = None,
    plan: str | os.PathLike | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """A checkpoint's model built on the meta device from its config alone (converted when it is
    a compressed-experts checkpoint or a rule, ``n_ce``, ``top_p`` or ``skip_below``, or a
    ``plan`` is given): for inspecting structure and counting parameters of a large model without
    reading its weights. (``tiny:`` models are simply built.)"""
    source = resolve(source)
    asked = _asked(n_ce, form, r, top_p, skip_below)
    if plan is not None:
        _check_plan_alone(plan, asked)
        shape = skeleton(source, **kwargs)
        swap_blocks(shape, _fitting_plan(plan, shape, source))
        return shape
    if tiny_family(source) is not None:
        return from_pretrained(source, **asked)
    config, ce = _resolve(source, _read_config(source, kwargs), asked)
    return _skeleton(_causal_lm_class(source, config), config, ce)


def from_pretrained(
    source: str | os.PathLike,
    n_ce: int | None = None,
    form: str | None = None,
    r: int | None = None,
    *,
    top_p: float | None = None,
    skip_below: float | None = None,
    plan: str | os.PathLike | None = None,
    verify: bool | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM: a saved compressed-experts model, or a plain MoE checkpoint.

    ``source`` is a local directory, a hub id, or ``tiny:<family>`` for a tiny model with
    random weights (offline try-outs and tests). A PEFT adapter directory gives a ``PeftModel``
    (in eval mode) on the base it names, loaded through this function: an adapter trained on a
    model converted in memory from a plain checkpoint needs the ``n_ce`` it was trained with. A plain checkpoint is converted when
    ``n_ce`` is given, to ``form`` (default ``"ia3"``, the paper's vectors; ``"none"`` for
    the top-m baseline; ``"subset"``/``"slim"`` with ``r`` neurons, see :class:`CEConfig`); or,
    instead of ``n_ce``, when a per-token rule is given (``top_p`` or ``skip_below``, see
    :class:`CEConfig`); or, block by block, to the settings of a ``plan`` (a plan.json written by
    :func:`compressed_experts.plan.plan` for this model). Other keyword arguments (``dtype``,
    ``device_map``, ``revision``...) go to transformers' ``from_pretrained``.

    A local directory saved by this library is checked against its checksum manifest first
    (:func:`verify_checkpoint`): ``verify=None`` hashes every file of a checkpoint of up to
    :data:`VERIFY_LIMIT` bytes and, above that, checks sizes, safetensors headers and the small
    files (config.json among them); ``verify=True`` always hashes everything; ``verify=False``
    skips the manifest. Unless ``verify=False``, a model whose weights hold NaN or inf is refused,
    naming the tensor.
    """
    source = resolve(source)
    asked = _asked(n_ce, form, r, top_p, skip_below)
    if plan is not None:  # the plan and the model are checked on the skeleton, before any weight is read
        _check_plan_alone(plan, asked)
        configs = _fitting_plan(plan, skeleton(source, **kwargs), source)
        return convert(from_pretrained(source, verify=verify, **kwargs), configs)
    requested = _requested(asked)
    family = tiny_family(source)
    if family is not None:
        unsupported = sorted(set(kwargs) - {"dtype"})
        if unsupported:
            raise CompressedExpertsError(f"tiny: models take only dtype, not {', '.join(unsupported)}")
        if requested is None:
            _needs_n_ce(asked)
        model = tiny_model(family, dtype=kwargs.get("dtype"))
        return convert(model, requested) if requested is not None else model
    adapter = _adapter_config(Path(source))
    if adapter is not None:
        return _load_adapter(Path(source), adapter, asked, {**kwargs, "verify": verify})
    config_dict = _read_config(source, kwargs)
    config, ce = _resolve(source, config_dict, asked)
    model_cls = _causal_lm_class(source, config)
    # Structure errors (dense or unsupported model, n_ce out of range) surface here, before any weight is read.
    expected = _skeleton(model_cls, config, ce) if ce is not None else None
    local = local_dir(source, kwargs.get("subfolder"))
    if local is not None and verify is not False:
        verify_checkpoint(local, full=verify)  # an edited config.json is caught here, before it is used
    saved = _local_shapes(local) if local is not None else None
    if config_dict.get("model_type") != SAVED_MODEL_TYPE:
        if saved and any(is_compressed_expert(k) for k in saved):
            raise CheckpointError(
                f"{source} holds compressed-expert weights but its config.json has no compressed_experts "
                f"section: restore the config.json that was saved with it"
            )
        model = _load(model_cls, source, config, kwargs, check_finite=verify is not False)
        return convert(model, ce) if ce is not None else model
    if saved is not None:
        if not saved:
            raise CheckpointError(f"{source} holds no *.safetensors weights")
        _check_compressed_shapes(saved, expected)
    mark_config(config, ce)  # what the loader class converts to, as it is built
    # back to model_cls once filled
    return _load(loader_class(model_cls), source, config, kwargs, check_finite=verify is not False)


def _load(
    model_cls: type[PreTrainedModel],
    source: str,
    config: PretrainedConfig,
    kwargs: dict[str, Any],
    check_finite: bool = True,
):
    """transformers' loader, with its failures, any missing or misshapen weight and (with
    ``check_finite``) any NaN or inf weight turned into a one-line CheckpointError."""
    refuse_mismatch = "ignore_mismatched_sizes" not in kwargs  # reported below, by name, rather than raised
    options = {"ignore_mismatched_sizes": True, **kwargs} if refuse_mismatch else kwargs
    try:
        model, info = model_cls.from_pretrained(source, config=config, output_loading_info=True, **options)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {source!r}: {first_line(err)}") from err
    except RuntimeError as err:  # transformers could not assemble the weights (its report above says which)
        raise CheckpointError(
            f"cannot load {source!r}: its weights do not fit the model its config.json describes (a tensor is "
            f"missing or has another shape; transformers: {first_line(err)})"
        ) from err
    if info["missing_keys"]:
        raise CheckpointError(f"{source} is missing weights: {', '.join(sorted(info['missing_keys'])[:5])}")
    mismatched = sorted(info.get("mismatched_keys") or ()) if refuse_mismatch else []
    if mismatched:
        key, found, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{source}: {key} has shape {list(found)} in the checkpoint but its config.json implies "
            f"{list(wanted)}{more}: a tensor is missing or the weights and config.json do not belong together"
        )
    if check_finite:
        _check_finite(model, source)
    return model


def load_tokenizer(source: str | os.PathLike, **kwargs: Any):
    """The tokenizer that goes with ``source`` (``tiny:`` sources get the tiny character tokenizer).

    Raises a :class:`CheckpointError` that says what to do when the source has none.
    """
    source = resolve(source)
    if tiny_family(source) is not None:
        return tiny_tokenizer()
    if not Path(source).exists() and not is_hub_id(source):
        raise CheckpointError(f"no such model directory: {source} (and it is not a hub id of the form org/name)")
    adapter = _adapter_config(Path(source))
    if adapter is not None and not (Path(source) / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter["base_model_name_or_path"], **kwargs)  # the base's, as PEFT leaves it
    from transformers import AutoTokenizer

    advice = (
        "save one into the model directory (tokenizer.save_pretrained), "
        "or take one from another source (the tokenizer setting)"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"no tokenizer found for {source} ({first_line(err)}): {advice}") from err
    # transformers can build a tokenizer with no vocabulary from a config alone; it encodes all text to nothing.
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise CheckpointError(f"{source} has no usable tokenizer (it encodes text to no tokens): {advice}")
    return tokenizer


def save_compressed_experts(model: PreTrainedModel, path: str | os.PathLike) -> None:
    """Write only the compressed experts of ``model`` (a few MB) to a safetensors file.

    With the base model they were trained on, the file is the whole fine-tune when only the
    vectors were trained; :func:`apply_compressed_experts` puts them back. In a distributed run
    every process should call it: parameters sharded by FSDP2 are gathered (which takes every
    process), and only the first process writes the file.
    """
    from safetensors.torch import save_file

    ce = ce_config_of(base_of(model))
    vectors = {n: _whole(p.detach()).contiguous() for n, p in named_weights(model) if is_compressed_expert(n)}
    if ce is None or not vectors:
        forms = sorted({c.form for c in ((ce,) if isinstance(ce, CEConfig) else ce)}) if ce is not None else []
        form = (
            f" (form {', '.join(forms)} adds no parameters; its choice of neurons lives in the expert weights)"
            if forms
            else ""
        )
        raise CompressedExpertsError(
            f"this model has no compressed-expert parameters to save{form}: use save_pretrained"
        )
    # The config section as JSON (safetensors metadata holds strings); for one setting also its fields
    # one by one (the rule's one setting, form, r when there is one, format_version), as files were written
    # before plans, which libraries of that time read.
    section = settings_to_dict(ce)
    meta = {"compressed_experts": json.dumps(section), "base_model_type": base_of(model).config.model_type}
    if isinstance(ce, CEConfig):
        meta |= {key: str(value) for key, value in section.items() if value is not None}
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_file({n: v.cpu() for n, v in vectors.items()}, os.fspath(path), metadata=meta)


def _vectors_section(path, meta: dict[str, str]) -> dict[str, Any]:
    """The settings section a vectors file carries: as JSON, or (files from before plans) field by field."""
    if "compressed_experts" in meta:
        try:
            section = json.loads(meta["compressed_experts"])
        except ValueError as err:
            raise CheckpointError(f"{path}: its compressed_experts metadata is not JSON ({err})") from None
        if isinstance(section, dict):
            return section
    numbers = {"n_ce": int, "r": int, "top_p": float, "skip_below": float, "format_version": int}
    try:
        section = {key: numbers[key](meta[key]) for key in numbers if key in meta}
        section["form"] = meta["form"]
        if not set(RULES) & set(section):
            raise KeyError("n_ce")
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path} is not a compressed-experts file (no n_ce/form metadata)") from err
    return section


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor sharded by FSDP2 (a DTensor) gathered whole (every process must take part); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def apply_compressed_experts(model: PreTrainedModel, path: str | os.PathLike) -> PreTrainedModel:
    """Convert ``model`` in place (the base the vectors were trained on), load the vectors from
    ``path``, and return it. Checks the family and every vector's name and shape before changing anything.
    """
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            vectors = {current_key(key): handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read compressed experts from {path}: {first_line(err)}") from err
    ce = settings_from_dict(_vectors_section(path, meta))  # a newer format is refused, naming the upgrade
    if meta.get("base_model_type") != model.config.model_type:
        raise CheckpointError(
            f"{path} was trained on a {meta.get('base_model_type')} model; this one is {model.config.model_type}"
        )
    existing = ce_config_of(model)
    if existing is not None and existing != ce:
        raise CompressedExpertsError(
            f"the model already has other compressed experts ({existing}); give the base model"
        )
    if existing is None and any(c.kept_experts is not None for c in (ce if isinstance(ce, tuple) else (ce,))):
        raise CompressedExpertsError(
            f"{path} holds stand-ins of a model pruned with them: they apply only to that pruned model (its kept "
            f"experts renumbered first, the others removed), not to an unpruned one. Load the pruned model "
            f"(compressed_experts.from_pretrained) and apply them to it"
        )
    # Names and shapes are checked on a meta-device twin first, so a mismatch changes nothing.
    twin = model if existing is not None else _skeleton(type(model), model.config, ce)
    shapes = {n: tuple(p.shape) for n, p in twin.named_parameters() if is_compressed_expert(n)}
    wrong = sorted(set(shapes) ^ set(vectors)) or [n for n in shapes if shapes[n] != tuple(vectors[n].shape)]
    if wrong:
        raise CheckpointError(
            f"{path} does not fit this model (first mismatch: {wrong[0]}): was it trained on another one?"
        )
    if existing is None:
        convert(model, ce)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, vector in vectors.items():
            params[name].copy_(vector)
    return model


# Output directories: one policy for every command that writes a model or a run.

#: The file this library writes into every directory it writes (a model, a run, a demo): what
#: wrote it and, for a saved model, the size and sha256 of every file (the checksum manifest).
#: ``overwrite`` replaces only a directory that holds it; loading checks the files against it.
MARKER = "compressed_experts_manifest.json"

#: What ``overwrite`` replaces unless told otherwise: a directory this library wrote. (A model
#: saved by ``save_pretrained`` alone has no marker: it is not replaced.)
MODEL_MARKERS = (MARKER,)

#: Loading verifies the sha256 of every file named in the manifest when they total at most this
#: many bytes (about a second of hashing); above it, only what is cheap (see :func:`verify_checkpoint`).
VERIFY_LIMIT = 1 << 30

#: Files up to this size are always hashed on load (config.json, the tokenizer, the shard index).
_SMALL_FILE = 16 << 20


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_not_an_input(out: str | os.PathLike, sources: Mapping[str, Any] | None) -> None:
    """Refuse an ``out`` that is, holds or lies inside one of ``sources`` (label -> source)."""
    target = Path(out)
    for label, value in (sources or {}).items():
        path = local_path(value) if value not in (None, "") else None  # "" would be the working directory
        if path is None:
            continue
        if path.resolve() == target.resolve():
            raise CompressedExpertsError(
                f"out {out} overlaps the {label} ({value}): it is the {label} itself; choose another out",
                settings=("out",),
            )
        if _inside(path, target) or _inside(target, path):
            raise CompressedExpertsError(
                f"out {out} overlaps the {label} ({value}): choose another out", settings=("out",)
            )


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    sources: Mapping[str, Any] | None = None,
    replaces: str = "a model directory",
    markers: Sequence[str] = MODEL_MARKERS,
    keep: bool = False,
    resumable: bool = False,
    lock: bool = True,
) -> bool:
    """Check that ``out`` may be written to; return whether it holds files that must be replaced.

    Nothing is deleted here: the caller replaces ``out`` (:func:`save_model` does so) once every
    other check has passed. Refused, with a :class:`CompressedExpertsError` that says what to do:

    - ``out`` is a file, or the working directory or a folder above it;
    - ``out`` is, holds or lies inside one of ``sources`` (label -> source, e.g.
      ``{"source model": "bundled", "data": "train.jsonl"}``; sources that are not on this machine,
      hub ids and ``tiny:`` models, cannot be overwritten and are skipped);
    - another process is writing ``out`` (see :func:`output_lock`);
    - ``out`` holds files and ``overwrite`` is not given;
    - ``overwrite`` is given but ``out`` holds none of ``markers`` (by default the library's own
      marker file, :data:`MARKER`): ``overwrite`` only ever replaces what this library wrote.

    With ``lock`` (the default) this process takes ``out``'s lock and holds it until ``out`` is
    committed (:func:`commit_staged`), :func:`release_output` or the end of the process. With
    ``keep`` (``out`` is continued, not replaced: a resumed run), the checks of what ``out``
    holds do not apply. ``resumable`` adds "use resume" to the advice for a directory that is not empty.
    """
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise CompressedExpertsError(f"out {out} is a file; give a directory", settings=("out",))
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise CompressedExpertsError(
            f"out {out} is the working directory or above it: choose a subdirectory", settings=("out",)
        )
    _check_not_an_input(out, sources)
    if lock and target.resolve() not in _HELD:
        _acquire(target)  # before looking inside: another run may be about to write there
        _HELD.add(target.resolve())
        try:
            return _check_contents(target, overwrite, replaces, markers, keep, resumable)
        except BaseException:
            release_output(target)
            raise
    return _check_contents(target, overwrite, replaces, markers, keep, resumable)


def _check_contents(
    target: Path, overwrite: bool, replaces: str, markers: Sequence[str], keep: bool, resumable: bool
) -> bool:
    out = target
    if keep or not target.is_dir() or not any(target.iterdir()):
        return False
    if not overwrite:
        advice = (
            "choose another out, pass overwrite to replace it, or use resume to continue it"
            if resumable
            else "choose another out or pass overwrite to replace it"
        )
        raise CompressedExpertsError(
            f"out {out} is not empty (it already holds files): {advice}",
            settings=("out", "overwrite", "resume") if resumable else ("out", "overwrite"),
        )
    if not any((target / marker).exists() for marker in markers):
        if (target / "config.json").is_file():
            held = (
                f"a model that compressed-experts did not write (saved by save_pretrained or another tool: "
                f"no {MARKER}); not deleting it"
            )
        else:
            held = f"files that are not {replaces}; not deleting them"
        raise CompressedExpertsError(
            f"overwrite only replaces {replaces} written by compressed-experts (one with "
            f"{' or '.join(markers)}); {out} holds {held}: remove it yourself or choose another out",
            settings=("overwrite", "out"),
        )
    return True


def check_output_file(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    sources: Mapping[str, Any] | None = None,
    what: str = "results file",
    setting: str = "out",
    suffix: str | None = None,
    ours: Any = None,
) -> None:
    """The output policy for a single file (a results JSON, a plot): refuse an ``out`` that is a
    folder, lacks ``suffix``, is or lies inside one of ``sources``, or exists and ``overwrite``
    is not given; with ``overwrite``, refuse to replace a file that ``ours(path)`` (when given)
    does not recognise as one this library wrote."""
    path = Path(out)
    if path.is_dir() or not path.name or path.name in (".", ".."):
        example = (path / f"results{suffix or '.json'}") if path.name else Path(f"results{suffix or '.json'}")
        raise CompressedExpertsError(
            f"{setting} {out} is a folder; give a file name such as {example}", settings=(setting,)
        )
    if suffix is not None and path.suffix.lower() != suffix:
        raise CompressedExpertsError(
            f"{setting} {out} must be a {suffix} file name (e.g. {path.with_suffix(suffix)})", settings=(setting,)
        )
    for label, value in (sources or {}).items():
        source = local_path(value) if value not in (None, "") else None
        if source is not None and _inside(path, source):
            kind = "is" if path.resolve() == source.resolve() else "lies inside"
            raise CompressedExpertsError(
                f"{setting} {out} {kind} the {label} ({value}): writing it would change an input; "
                f"choose another {setting}",
                settings=(setting,),
            )
    if not path.exists():
        return
    if not overwrite:
        raise CompressedExpertsError(
            f"{setting} {out} already exists: choose another {setting} or pass overwrite to replace it",
            settings=(setting, "overwrite"),
        )
    if ours is not None and not ours(path):
        raise CompressedExpertsError(
            f"overwrite only replaces a {what} written by compressed-experts; {out} is not one; not replacing it",
            settings=("overwrite", setting),
        )


# Locks: one writer per output. A lock file beside the output (in its parent, so that replacing
# the output does not move it) is held with flock; a second process fails at once.

_LOCKS: dict[Path, list[Any]] = {}  # resolved output -> [open lock file, count] (re-entrant per process)
_HELD: set[Path] = set()  # outputs locked by check_output_dir, released when committed


def lock_file(out: str | os.PathLike) -> Path:
    """The lock file of an output: hidden, beside it (removed when its lock is released)."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _acquire(out: Path) -> None:
    import fcntl

    key = out.resolve()
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return
    path = lock_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CompressedExpertsError(
                f"out {out} is being written by another run ({holder}): wait for it to finish, or choose another out",
                settings=("out",),
            ) from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _LOCKS[key] = [handle, 1]


def _release(out: Path) -> None:
    key = out.resolve()
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _LOCKS[key]
    handle = entry[0]
    try:
        os.unlink(lock_file(key))  # while still locked: whoever opens it next locks a new file
    except FileNotFoundError:
        pass
    handle.close()


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``out``'s lock for the ``with`` block: another process that tries to write ``out``
    meanwhile (through this library) fails at once, naming this one. Re-entrant within a process;
    a hold :func:`check_output_dir` takes on ``out`` inside the block ends with the block."""
    key = Path(out).resolve()
    held_before = key in _HELD
    _acquire(key)
    try:
        yield
    finally:
        if not held_before:
            release_output(key)  # a hold check_output_dir took inside the block ends with it
        _release(key)


def release_output(out: str | os.PathLike) -> None:
    """Release the lock :func:`check_output_dir` took on ``out`` (committing ``out`` does so too)."""
    key = Path(out).resolve()
    if key in _HELD:
        _HELD.discard(key)
        _release(key)


@atexit.register
def _release_all() -> None:
    for key in list(_LOCKS):
        _LOCKS[key][1] = 1
        _release(key)


# The marker and checksum manifest.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _header_sha256(path: Path) -> str | None:
    """The sha256 of a safetensors file's length and header (names, dtypes, shapes, offsets), or None."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return None
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > path.stat().st_size:
            return None
        return hashlib.sha256(raw + handle.read(length)).hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    if path.suffix == ".safetensors":
        entry["header_sha256"] = _header_sha256(path)
    return entry


def write_marker(directory: str | os.PathLike, kind: str, *, files: Sequence[str] = ()) -> None:
    """Write :data:`MARKER` into ``directory``: what wrote it (``kind``: model, run, demo...) and the
    size and sha256 of each of ``files`` (names relative to ``directory``; the checksum manifest)."""
    directory = Path(directory)
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("compressed-experts")
    except PackageNotFoundError:
        release = "unknown"
    manifest = {
        "written_by": "compressed-experts",
        "version": release,
        "kind": kind,
        "files": {name: _entry(directory / name) for name in sorted(files)},
    }
    write_atomic(directory / MARKER, json.dumps(manifest, indent=1) + "\n")


def _model_files(directory: Path) -> list[str]:
    """The files of a saved model directory to list in its manifest: every file below it but the
    marker itself, the lock and staging leftovers (hidden), and a run's checkpoints and log."""
    names = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or relative.parts[0] in (MARKER, "checkpoints") or relative.parts[0].startswith("."):
            continue
        names.append(relative.as_posix())
    return names


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a directory this library wrote (None where there is none)."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
            raise TypeError("files")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path} is corrupt ({first_line(err)}): re-save the model, or delete {MARKER} to load it unchecked"
        ) from err
    return manifest


def verify_checkpoint(directory: str | os.PathLike, *, full: bool | None = True) -> dict[str, Any]:
    """Check a directory this library saved against its checksum manifest; raise a one-line
    :class:`CheckpointError` naming the first file that differs (missing, resized, edited).

    ``full=True`` hashes every file and also scans every safetensors tensor for NaN and inf;
    ``False`` checks what is cheap: each file's size, each safetensors header (names, shapes,
    dtypes and data offsets) and the whole of every small file (config.json included, so an
    edited ``n_ce`` or ``num_experts_per_tok`` is caught); ``None`` is full when the files
    total at most :data:`VERIFY_LIMIT` bytes, else cheap. Returns ``{"files", "bytes", "hashed",
    "manifest"}`` (``manifest`` False, and nothing checked, where the directory has none).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return {"files": 0, "bytes": 0, "hashed": 0, "manifest": False}
    files = manifest["files"]
    total = sum(int(entry.get("size", 0)) for entry in files.values())
    if full is None:
        full = total <= VERIFY_LIMIT
    advice = (
        f"re-save or re-download the model (if you saved over it with another tool, delete its {MARKER}, "
        f"which describes the earlier save)"
    )
    hashed = 0
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} lacks {name}, which its {MARKER} lists: {advice}")
        edited = (
            f"; if you edited {name} on purpose, re-save the model (or load it with verify=False)"
            if path.suffix == ".json"
            else ""
        )
        size = path.stat().st_size
        why = None
        if size != entry.get("size"):
            why = f"{size} bytes; {MARKER} says {entry.get('size')}: truncated or rewritten"
        elif entry.get("header_sha256") and _header_sha256(path) != entry["header_sha256"]:
            why = "another safetensors header: tensor names, shapes or data offsets"
        elif full or size <= _SMALL_FILE:
            hashed += size
            if _sha256(path) != entry["sha256"]:
                why = f"its sha256 differs from {MARKER}"
        if why is not None:
            raise CheckpointError(f"{path} has changed since it was saved ({why}): {advice}{edited}")
    if full:
        for name in files:
            if name.endswith(".safetensors"):
                _check_finite_file(directory / name)
    return {"files": len(files), "bytes": total, "hashed": hashed, "manifest": True}


def _first_non_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds a NaN or inf (checked in slices, so memory stays small)."""
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return False
    flat = tensor.detach().reshape(-1)
    return any(not bool(torch.isfinite(part).all()) for part in flat.split(1 << 24))


def _check_finite_file(file: Path) -> None:
    from safetensors import safe_open

    with safe_open(os.fspath(file), framework="pt") as handle:
        for key in handle.keys():
            if _first_non_finite(handle.get_tensor(key)):
                raise CheckpointError(f"{file} holds NaN or inf in {key}: re-save or re-download the model")


def _check_finite(model: PreTrainedModel, source: str) -> None:
    """Refuse a loaded model whose weights hold NaN or inf, naming the first such tensor."""
    for name, param in named_weights(model):
        if _first_non_finite(param):
            raise CheckpointError(
                f"{source} holds NaN or inf in {name}: the checkpoint is corrupt or was saved from a diverged run"
            )


def staging_dir(out: str | os.PathLike) -> Path:
    """Where a save to ``out`` is staged: a hidden folder beside it, named after it (the same name
    on every process of a distributed run, and the same on the next try, which clears a leftover)."""
    out = Path(out)
    return out.parent / f".{out.name}.staging"


def commit_staged(staging: Path, out: Path, *, merge: bool = False, manifest: bool | None = None) -> None:
    """Move what was saved in ``staging`` into place at ``out``, and remove ``staging``.

    By default ``out`` is replaced whole: an earlier ``out`` is set aside first and deleted only
    once the new one is in place (restored if that fails). With ``merge``, each file of
    ``staging`` replaces its namesake in ``out`` and the rest of ``out`` stays (a run directory
    receiving its final model beside its log).

    With ``manifest`` (the default with ``merge``: a run's final model) the marker and checksum
    manifest of what ``staging`` holds are written first (:func:`write_marker`). The lock that
    :func:`check_output_dir` took on ``out`` is released once ``out`` is in place.
    """
    staging, out = Path(staging), Path(out)
    if manifest if manifest is not None else merge:
        write_marker(staging, "run" if merge else "model", files=_model_files(staging))
    if merge:
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        shutil.rmtree(staging, ignore_errors=True)
        release_output(out)
        return
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    release_output(out)


@contextmanager
def staged_save(out: str | os.PathLike, *, merge: bool = False, manifest: bool = True) -> Iterator[Path]:
    """A fresh staging directory for ``out``: write into it in the ``with`` block; when the
    block ends without an error it is moved into place (:func:`commit_staged`, with the marker
    and checksum manifest unless ``manifest=False``), and whatever happens it is gone
    afterwards, so a failed save leaves ``out`` as it was. ``out`` is locked meanwhile."""
    out = Path(out)
    staging = staging_dir(out)
    with output_lock(out):
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of an earlier save that was killed
        staging.mkdir(parents=True)
        try:
            yield staging
            commit_staged(staging, out, merge=merge, manifest=manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def tokenizer_if_any(source: str | os.PathLike, **kwargs: Any):
    """The tokenizer of ``source`` (see :func:`load_tokenizer`), or None when it has none."""
    try:
        return load_tokenizer(source, **kwargs)
    except CheckpointError:
        return None


def save_model(
    model: PreTrainedModel,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> None:
    """Save ``model`` (``save_pretrained``), its ``tokenizer`` when given, and ``extra_files``
    (file name -> text or bytes) into ``out``, replacing what is there, in one step: all of it
    is staged beside ``out`` and moved into place at the end (:func:`staged_save`).

    Check ``out`` with :func:`check_output_dir` first: this replaces whatever ``out`` holds.
    """
    with staged_save(out) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
