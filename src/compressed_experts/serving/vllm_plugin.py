"""The vLLM plugin: vLLM loads it in every process through the ``vllm.general_plugins`` entry point.

:func:`register` teaches vLLM the compressed-experts checkpoints: importing the library registers
their config with transformers' ``AutoConfig`` (what vLLM reads config.json with), and each
architecture a saved config.json names (``CompressedExperts<Base>ForCausalLM``) is registered with
vLLM's model registry, lazily, as a class of :mod:`compressed_experts.serving.vllm_models`.
Without the plugin, vLLM refuses such a checkpoint (transformers does not know its model type),
instead of serving its base family with the compressed experts dropped; with it, a compressed
checkpoint of a family it does not serve is refused with :func:`unserved`'s message.

:func:`check_servable` says the same before vLLM starts (``compressed-experts serve``,
``eval --engine vllm``, ``bench --engine vllm``), and also when vLLM would not load this plugin.
This module imports nothing of vLLM until :func:`register` runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

from ..config import ARCHITECTURE_PREFIX, SAVED_MODEL_TYPE, SECTION, Settings, settings_from_dict
from ..errors import CheckpointError, CompressedExpertsError
from ..sources import local_path

#: The entry point group vLLM loads in every process, and this plugin's name in it (pyproject.toml):
#: the name ``VLLM_PLUGINS`` must list when it is set.
GROUP = "vllm.general_plugins"
PLUGIN = "compressed_experts"

#: The base architectures, as transformers names them, whose compressed-experts checkpoints vLLM serves.
BASE_ARCHITECTURES = (
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "PhimoeForCausalLM",
    "DeepseekV3ForCausalLM",
)
ARCHITECTURES = tuple(ARCHITECTURE_PREFIX + base for base in BASE_ARCHITECTURES)


def unserved(architectures: Iterable[str]) -> str | None:
    """Why vLLM with this plugin does not serve a compressed-experts checkpoint naming ``architectures``
    (None when it does, or when none of them is a compressed-experts architecture)."""
    names = [name for name in architectures if name.startswith(ARCHITECTURE_PREFIX)]
    if not names or any(name in ARCHITECTURES for name in names):
        return None
    return (
        f"architecture {names[0]} is a compressed-experts checkpoint of a family this package's vLLM plugin "
        f"does not serve (it serves {', '.join(ARCHITECTURES)}); run it with transformers instead: "
        "compressed_experts.from_pretrained(DIR), or compressed-experts eval --engine transformers"
    )


def served_settings(section: Any) -> Settings:
    """The compressed-experts settings the plugin serves a checkpoint with, from its config's
    ``compressed_experts`` section: a fixed ``n_ce`` or a per-token rule (``top_p``, ``skip_below``),
    with the form and ``r``, for every MoE block or (a plan) one per block. Refused, with what is
    wrong, when absent or unreadable (a format newer than this library's)."""
    if not isinstance(section, dict):
        raise CheckpointError(
            "this config has no compressed_experts section: it is not a compressed-experts checkpoint "
            "(serve a plain model with vLLM's own architecture)"
        )
    return settings_from_dict(section)


def not_loaded() -> str | None:
    """Why vLLM, started from this environment, would not load this plugin (None when it would)."""
    if not any(entry.name == PLUGIN for entry in entry_points(group=GROUP)):
        return (
            f"this package is importable but not installed (no {GROUP} entry point {PLUGIN!r}), so vLLM "
            "does not load its plugin: install it into vLLM's environment (pip install -e . in the repository; "
            "docs/serving.md)"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN not in allowed.split(","):
        return (
            f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN!r}, so vLLM would not load this package's plugin: "
            f"add it (VLLM_PLUGINS={PLUGIN}{',' + allowed if allowed else ''}) or unset VLLM_PLUGINS"
        )
    return None


def check_servable(source: Any, *, converted: bool = False) -> None:
    """Refuse, before vLLM starts, a local compressed-experts checkpoint vLLM would refuse: this
    plugin not loaded, a family it does not serve, or compressed-experts settings it cannot read
    (:func:`served_settings`). ``converted``: ``source`` is to be converted
    first (``bench``), so a plain checkpoint is checked as its compressed-experts form. Plain
    checkpoints (vLLM serves them itself), hub ids and folders without a readable config.json pass."""
    path = local_path(source)
    config_file = path / "config.json" if path is not None and path.is_dir() else None
    try:
        config = json.loads(config_file.read_text()) if config_file is not None else None
    except (OSError, ValueError):
        config = None  # vLLM (or the loader) reports it with its own words
    if not isinstance(config, dict) or not (converted or config.get("model_type") == SAVED_MODEL_TYPE):
        return
    names = [
        name if name.startswith(ARCHITECTURE_PREFIX) else ARCHITECTURE_PREFIX + name
        for name in config.get("architectures") or ()
        if isinstance(name, str)
    ]
    why = not_loaded() or unserved(names)
    if why:
        raise CompressedExpertsError(f"{source}: {why}")
    if not converted:  # what the plugin will read from config.json, read now: refused before vLLM starts
        try:
            served_settings(config.get(SECTION))
        except CompressedExpertsError as err:
            raise CompressedExpertsError(f"{source}: vLLM's plugin cannot serve it: {err}") from None


def register() -> None:
    """The entry point: register the compressed-experts architectures with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from .. import auto_classes

    auto_classes.register()  # AutoConfig knows model_type compressed_experts
    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in known:
            ModelRegistry.register_model(arch, f"compressed_experts.serving.vllm_models:{arch}")
    _refuse_unserved(ModelRegistry)


def _refuse_unserved(registry: Any) -> None:
    """vLLM's refusal of an architecture it does not know lists its hundreds of architectures; for a
    compressed-experts one, say what :func:`unserved` says instead."""
    original = registry._raise_for_unsupported
    if getattr(original, "compressed_experts", False):
        return

    def raise_for_unsupported(architectures: list[str]) -> Any:
        why = unserved(architectures)
        if why:
            raise CompressedExpertsError(why)
        return original(architectures)

    raise_for_unsupported.compressed_experts = True  # type: ignore[attr-defined]
    registry._raise_for_unsupported = raise_for_unsupported
