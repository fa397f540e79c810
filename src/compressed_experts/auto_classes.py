"""Compressed-experts checkpoints through transformers' Auto classes, once this package is imported.

A saved directory's config.json has ``model_type: compressed_experts`` (a type transformers
does not know, so nothing loads it as the plain base model by mistake), the base family in its
``compressed_experts`` section, and architectures named ``CompressedExperts<Base>ForCausalLM``
(so that a tool that picks its model class by architecture, a serving engine say, refuses it
rather than serving the base family with the compressed experts dropped).

:func:`register` (run on import) teaches ``AutoConfig`` that model type and teaches
``AutoModelForCausalLM`` one loader class per supported family: the family's own causal-LM
class, converted as it is built, so that transformers' loader fills the compressed experts.
``AutoConfig.from_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)`` then give
what :func:`compressed_experts.from_pretrained` gives, and so does any tool that loads by path
through them (lm-evaluation-harness's ``hf`` model, for one) in a process that imported
``compressed_experts``.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .architectures import FAMILIES
from .config import SAVED_MODEL_TYPE, SECTION, mark_config, saving_class, settings_from_dict, split_saved
from .convert import swap_blocks
from .errors import CheckpointError

_LOADERS: dict[type, type] = {}

#: Checkpoints saved before the compressed experts moved into their own submodule (for PEFT)
#: name them ``...experts.ce_gate``; transformers' loader renames them to ``...experts.compressed.ce_gate``.
LEGACY_KEYS = {r"\.experts\.(ce_[a-z_]+)$": r".experts.compressed.\1"}


#: Keyword arguments of ``from_pretrained`` that also say where config.json is.
_CONFIG_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download")


def current_key(key: str) -> str:
    """A saved parameter name as this version names it (see :data:`LEGACY_KEYS`)."""
    for pattern, replacement in LEGACY_KEYS.items():
        key = re.sub(pattern, replacement, key)
    return key


class CompressedExpertsConfig(PretrainedConfig):
    """What ``AutoConfig`` finds under ``model_type: compressed_experts``: it reads such a config.json
    as its base family's config, carrying the compressed-experts section (never an instance itself)."""

    model_type = SAVED_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        base_type, fields, ce = split_saved(config_dict)
        if base_type not in CONFIG_MAPPING:
            raise CheckpointError(f"unknown base model type {base_type!r}: does this transformers know the family?")
        made = CONFIG_MAPPING[base_type].from_dict(fields, **kwargs)
        config = made[0] if isinstance(made, tuple) else made
        mark_config(config, ce)
        return made


def loader_class(model_cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``model_cls`` converted as it is built, to the compressed experts its config records."""
    if model_cls not in _LOADERS:

        def __init__(self, config, *args, **kwargs):
            if not isinstance(getattr(config, SECTION, None), dict):
                raise CheckpointError(
                    f"{type(self).__name__} builds compressed-experts models: this config has no compressed_experts "
                    f"section (a plain {model_cls.__name__} checkpoint?); load it with {model_cls.__name__}"
                )
            model_cls.__init__(self, config, *args, **kwargs)
            # The checkpoint holds the chosen neurons: nothing to select, only the blocks to swap.
            swap_blocks(self, settings_from_dict(getattr(config, SECTION)), saved=True)

        @classmethod
        def from_pretrained(cls, source, *args, **kwargs):
            kwargs.setdefault("key_mapping", LEGACY_KEYS)
            if "config" not in kwargs:  # called directly (PEFT's auto mapping does): read it as AutoConfig does
                hub = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
                kwargs["config"] = AutoConfig.from_pretrained(source, **hub)
            return model_cls.from_pretrained.__func__(cls, source, *args, **kwargs)

        name = f"CompressedExperts{model_cls.__name__}"
        attributes = {
            "__init__": __init__,
            "from_pretrained": from_pretrained,
            "config_class": saving_class(model_cls.config_class),
            "__module__": __name__,
            "__qualname__": name,
        }
        _LOADERS[model_cls] = globals()[name] = type(name, (model_cls,), attributes)  # importable by name
    return _LOADERS[model_cls]


def register() -> None:
    """Teach transformers' ``AutoConfig`` and ``AutoModelForCausalLM`` compressed-experts checkpoints."""
    if SAVED_MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(SAVED_MODEL_TYPE, CompressedExpertsConfig)
    for family in FAMILIES:
        base_config = CONFIG_MAPPING[family.model_types[0]]
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        if saving_class(base_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            AutoModelForCausalLM.register(saving_class(base_config), loader_class(model_cls))
