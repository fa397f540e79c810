"""Loading compressed-experts checkpoints (and plain MoE checkpoints) back.

Saving needs no code here: after :func:`convert`, the model's own ``save_pretrained`` writes
safetensors in transformers' hub layout plus a config.json whose ``model_type`` is
``compressed_experts`` and whose ``compressed_experts`` section names the family and ``n_ce``.
Loading goes through transformers' own loader (which fuses per-expert weights back), with
the model converted before the weights arrive so the loader fills the compressed experts too.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .config import SAVED_MODEL_TYPE, SECTION, CEConfig
from .convert import convert, swap_blocks
from .errors import CheckpointError, CompressedExpertsError
from .layer import is_compressed_expert
from .toy.bundled import BUNDLED, BUNDLED_DIR

#: Keyword arguments of ``from_pretrained`` that also matter for finding config.json.
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class _OwnModelTypeNotice(logging.Filter):
    """Drops transformers' warning that config type ``compressed_experts`` is not the one it
    builds: AutoTokenizer reads our config.json that way, and the tokenizer does not depend on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"model of type `{SAVED_MODEL_TYPE}` to instantiate" not in record.getMessage()


logging.getLogger("transformers.configuration_utils").addFilter(_OwnModelTypeNotice())
TINY_PREFIX = "tiny:"


def _read_config(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    path = Path(source, kwargs.get("subfolder") or "")  # as _local_dir sees it
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{source} is a file; give the model's directory (or a hub id)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a model directory: it has no config.json "
            f"(expected a directory written by save_pretrained, or a hub id)"
        )
    # Hub ids of MoE models are "org/name"; anything else that does not exist is a mistyped folder.
    if not path.exists() and not _HUB_ID.fullmatch(source):
        raise CheckpointError(f"no such model directory: {source} (and it is not a hub id of the form org/name)")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the config of {source!r}: {_first_line(err)}") from err
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("model_type"), str):
        raise CheckpointError(f"{source}: config.json is not a transformers model config (no model_type)")
    return config_dict


def _first_line(err: Exception) -> str:
    """transformers' messages can list hundreds of model types; the first sentence says enough."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking that the file holds all the bytes it names."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is truncated or not a safetensors file: re-save or re-download it")
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise CheckpointError(f"{file} is truncated or corrupt (header runs past the end): re-save or re-download it")
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
    if found != expected:
        show = lambda c: ", ".join(f"{kind} {list(shape)}" for kind, shape in sorted(c))  # noqa: E731
        raise CheckpointError(
            f"compressed-expert shapes disagree with config.json: found {show(found)}; "
            f"the config implies {show(expected)}"
        )


def _loader_class(model_cls: type[PreTrainedModel], ce: CEConfig) -> type[PreTrainedModel]:
    """``model_cls`` converted at construction, so that transformers' loader fills the compressed experts."""

    def __init__(self, config, *args, **kwargs):
        model_cls.__init__(self, config, *args, **kwargs)
        swap_blocks(self, ce)  # the checkpoint holds the chosen neurons: no selection to redo

    return type(model_cls.__name__, (model_cls,), {"__init__": __init__})


def _plain_config(source: str, model_type: Any, fields: dict[str, Any], what: str) -> PretrainedConfig:
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: {what} {model_type!r} ({_first_line(err)})") from err


def _requested(n_ce: int | None, form: str | None, r: int | None = None) -> CEConfig | None:
    """The conversion a caller asked for (validated before any download or load), or None.

    ``form`` alone is only a check against a converted checkpoint; see :func:`_resolve`.
    """
    if n_ce is None:
        if form is not None:
            CEConfig(0, form, r)  # raises the error that lists the forms, or says r does not apply
        return None
    return CEConfig(n_ce, "ia3" if form is None else form, r)


def _needs_n_ce(form: str | None, r: int | None) -> None:
    if form is not None or r is not None:
        asked = f"form={form!r}" if form is not None else f"r={r}"
        raise CompressedExpertsError(f"{asked} needs n_ce to convert a plain model: say how many experts per token it replaces")


def _resolve(
    source: str, config_dict: dict[str, Any], n_ce: int | None, form: str | None, r: int | None = None
) -> tuple[PretrainedConfig, CEConfig | None]:
    """The plain transformers config of a checkpoint and its compressed-experts settings, if any.

    For a converted checkpoint, ``n_ce``, ``form`` and ``r`` may be left out or repeat what it holds.
    """
    requested = _requested(n_ce, form, r)
    if config_dict.get("model_type") != SAVED_MODEL_TYPE:
        if requested is None:
            _needs_n_ce(form, r)
        fields = {k: v for k, v in config_dict.items() if k != "model_type"}
        return _plain_config(source, config_dict.get("model_type"), fields, "transformers does not know model type"), requested
    section = config_dict.get(SECTION)
    section = dict(section) if isinstance(section, dict) else {}
    base_type = section.pop("base_model_type", None)
    if not isinstance(base_type, str):
        raise CheckpointError(f"{source}: config.json has model_type {SAVED_MODEL_TYPE!r} but no base model type")
    ce = CEConfig.from_dict(section)
    asked = {"n_ce": n_ce, "form": form, "r": r}
    if any(value is not None and value != getattr(ce, key) for key, value in asked.items()):
        held = ", ".join(f"{key}={getattr(ce, key)}" for key in asked if getattr(ce, key) is not None)
        given = ", ".join(f"{key}={value}" for key, value in asked.items() if value is not None)
        raise CompressedExpertsError(
            f"{source} already has compressed experts with {held}; got {given}. "
            f"Leave them out, or convert the original model again"
        )
    fields = {k: v for k, v in config_dict.items() if k not in (SECTION, "model_type")}
    return _plain_config(source, base_type, fields, "unknown base model type"), ce


def _causal_lm_class(source: str, config: PretrainedConfig) -> type[PreTrainedModel]:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as err:
        raise CheckpointError(f"{source}: {type(config).__name__} has no causal-LM model class") from err


def _skeleton(model_cls: type[PreTrainedModel], config: PretrainedConfig, ce: CEConfig | None) -> PreTrainedModel:
    """The model's structure on the meta device: shapes and parameter counts without weights."""
    with torch.device("meta"):
        model = model_cls(copy.deepcopy(config))
    if ce is not None:
        swap_blocks(model, ce)
    return model


def _source(source: Any) -> str:
    """The source as a string; ``"bundled"`` becomes the directory of the model shipped in the package."""
    if not isinstance(source, (str, os.PathLike)):
        raise CompressedExpertsError(f"source must be a directory, a hub id or tiny:<family>, not {source!r}")
    source = os.fspath(source)
    if source == BUNDLED and not Path(source).exists():  # a local folder of that name still wins
        if not (BUNDLED_DIR / "config.json").is_file():
            raise CheckpointError(
                f"the bundled model is missing from this installation ({BUNDLED_DIR}); "
                f"rebuild it with: compressed-experts toy pretrain --ship"
            )
        return str(BUNDLED_DIR)
    return source


def _local_dir(source: str, kwargs: dict[str, Any]) -> Path | None:
    """The local directory holding the weights (``subfolder`` included), or None for a hub id."""
    path = Path(source, kwargs.get("subfolder") or "")
    return path if path.is_dir() else None


def skeleton(
    source: str | os.PathLike, n_ce: int | None = None, form: str | None = None, r: int | None = None, **kwargs: Any
) -> PreTrainedModel:
    """A checkpoint's model built on the meta device from its config alone (converted when it is
    a compressed-experts checkpoint or ``n_ce`` is given): for inspecting structure and counting
    parameters of a large model without reading its weights. (``tiny:`` models are simply built.)"""
    source = _source(source)
    if source.startswith(TINY_PREFIX):
        return from_pretrained(source, n_ce=n_ce, form=form, r=r)
    config, ce = _resolve(source, _read_config(source, kwargs), n_ce, form, r)
    return _skeleton(_causal_lm_class(source, config), config, ce)


def from_pretrained(
    source: str | os.PathLike, n_ce: int | None = None, form: str | None = None, r: int | None = None, **kwargs: Any
) -> PreTrainedModel:
    """Load a causal LM: a saved compressed-experts model, or a plain MoE checkpoint.

    ``source`` is a local directory, a hub id, or ``tiny:<family>`` for a tiny model with
    random weights (offline try-outs and tests). A plain checkpoint is converted when
    ``n_ce`` is given, to ``form`` (default ``"ia3"``, the paper's vectors; ``"none"`` for
    the top-m baseline; ``"subset"``/``"slim"`` with ``r`` neurons, see :class:`CEConfig`).
    Other keyword arguments (``dtype``, ``device_map``, ``revision``...)
    go to transformers' ``from_pretrained``.
    """
    source = _source(source)
    requested = _requested(n_ce, form, r)
    if source.startswith(TINY_PREFIX):
        from .tiny import tiny_model

        unsupported = sorted(set(kwargs) - {"dtype"})
        if unsupported:
            raise CompressedExpertsError(f"tiny: models take only dtype, not {', '.join(unsupported)}")
        if requested is None:
            _needs_n_ce(form, r)
        model = tiny_model(source[len(TINY_PREFIX):], dtype=kwargs.get("dtype"))
        return convert(model, requested) if requested is not None else model
    config_dict = _read_config(source, kwargs)
    config, ce = _resolve(source, config_dict, n_ce, form, r)
    model_cls = _causal_lm_class(source, config)
    # Structure errors (dense or unsupported model, n_ce out of range) surface here, before any weight is read.
    expected = _skeleton(model_cls, config, ce) if ce is not None else None
    local = _local_dir(source, kwargs)
    saved = _local_shapes(local) if local is not None else None
    if config_dict.get("model_type") != SAVED_MODEL_TYPE:
        if saved and any(is_compressed_expert(k) for k in saved):
            raise CheckpointError(
                f"{source} holds compressed-expert weights but its config.json has no compressed_experts "
                f"section: restore the config.json that was saved with it"
            )
        model = _load(model_cls, source, config, kwargs)
        return convert(model, ce) if ce is not None else model
    if saved is not None:
        if not saved:
            raise CheckpointError(f"{source} holds no *.safetensors weights")
        _check_compressed_shapes(saved, expected)
    model = _load(_loader_class(model_cls, ce), source, config, kwargs)
    model.__class__ = model_cls  # the loader subclass added nothing but its constructor
    return model


def _load(model_cls: type[PreTrainedModel], source: str, config: PretrainedConfig, kwargs: dict[str, Any]):
    """transformers' loader, with its failures and any missing weight turned into a CheckpointError."""
    try:
        model, info = model_cls.from_pretrained(source, config=config, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {source!r}: {_first_line(err)}") from err
    if info["missing_keys"]:
        raise CheckpointError(f"{source} is missing weights: {', '.join(sorted(info['missing_keys'])[:5])}")
    return model


def load_tokenizer(source: str | os.PathLike, **kwargs: Any):
    """The tokenizer that goes with ``source`` (``tiny:`` sources get the tiny character tokenizer).

    Raises a :class:`CheckpointError` that says what to do when the source has none.
    """
    source = _source(source)
    if source.startswith(TINY_PREFIX):
        from .tiny import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    advice = "save one into the model directory (tokenizer.save_pretrained), or name one with --tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"no tokenizer found for {source} ({_first_line(err)}): {advice}") from err
    # transformers can build a tokenizer with no vocabulary from a config alone; it encodes all text to nothing.
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise CheckpointError(f"{source} has no usable tokenizer (it encodes text to no tokens): {advice}")
    return tokenizer


def save_compressed_experts(model: PreTrainedModel, path: str | os.PathLike) -> None:
    """Write only the compressed experts of ``model`` (a few MB) to a safetensors file.

    With the base model they were trained on, the file is the whole fine-tune when only the
    vectors were trained; :func:`apply_compressed_experts` puts them back.
    """
    from safetensors.torch import save_file

    from .convert import ce_config_of

    ce = ce_config_of(model)
    vectors = {n: p.detach().contiguous() for n, p in model.named_parameters() if is_compressed_expert(n)}
    if ce is None or not vectors:
        form = "" if ce is None else f" (form {ce.form} adds no parameters; its choice of neurons lives in the expert weights)"
        raise CompressedExpertsError(f"this model has no compressed-expert parameters to save{form}: use save_pretrained")
    meta = {"n_ce": str(ce.n_ce), "form": ce.form, "base_model_type": model.config.model_type,
            "format_version": str(ce.to_dict()["format_version"])}
    if ce.r is not None:
        meta["r"] = str(ce.r)
    save_file(vectors, os.fspath(path), metadata=meta)


def apply_compressed_experts(model: PreTrainedModel, path: str | os.PathLike) -> PreTrainedModel:
    """Convert ``model`` in place (the base the vectors were trained on), load the vectors from
    ``path``, and return it. Checks the family and every vector's name and shape before changing anything.
    """
    from safetensors import safe_open

    from .convert import ce_config_of

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            vectors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read compressed experts from {path}: {_first_line(err)}") from err
    try:
        ce = CEConfig.from_dict({"n_ce": int(meta["n_ce"]), "form": meta["form"],
                                 "r": int(meta["r"]) if "r" in meta else None,
                                 "format_version": int(meta.get("format_version", 1))})
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path} is not a compressed-experts file (no n_ce/form metadata)") from err
    if meta.get("base_model_type") != model.config.model_type:
        raise CheckpointError(
            f"{path} was trained on a {meta.get('base_model_type')} model; this one is {model.config.model_type}"
        )
    existing = ce_config_of(model)
    if existing is not None and existing != ce:
        raise CompressedExpertsError(f"the model already has other compressed experts ({existing}); give the base model")
    # Names and shapes are checked on a meta-device twin first, so a mismatch changes nothing.
    twin = model if existing is not None else _skeleton(type(model), model.config, ce)
    shapes = {n: tuple(p.shape) for n, p in twin.named_parameters() if is_compressed_expert(n)}
    wrong = sorted(set(shapes) ^ set(vectors)) or [n for n in shapes if shapes[n] != tuple(vectors[n].shape)]
    if wrong:
        raise CheckpointError(f"{path} does not fit this model (first mismatch: {wrong[0]}): was it trained on another one?")
    if existing is None:
        convert(model, ce)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, vector in vectors.items():
            params[name].copy_(vector)
    return model
