"""The compressed-experts settings, validated when built."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import CheckpointError, CompressedExpertsError
from .forms import FORMS, NEURON_FORMS, REGISTRY, get_form
from .routing import RULES, Ruled, check_rule, rule_of

__all__ = [
    "DTYPE_NAMES",
    "FORMAT_VERSION",
    "FORMS",
    "NEURON_FORMS",
    "SAVED_MODEL_TYPE",
    "SECTION",
    "CEConfig",
    "Settings",
    "check_dtype_name",
    "collapsed",
    "mark_config",
    "per_block",
    "read_plan_file",
    "setting",
    "settings_from_dict",
    "settings_to_dict",
]

#: Version of the ``compressed_experts`` section written into a saved model's config.json. A section
#: with a per-token rule (``top_p``, ``skip_below``) is written as version 2, so that a library from
#: before them refuses it instead of reading it as a fixed ``n_ce``; one with a fixed ``n_ce`` is
#: still written as version 1, which every version reads.
#: A section with settings of its own for each MoE block (a plan, :mod:`compressed_experts.plan`)
#: is ``{"layers": [one section per block], "format_version": 3}``, written only when blocks differ.
#: One with ``kept_experts`` (pruned with stand-ins: fewer expert rows than the router picks from)
#: is version 4, which a library from before refuses with "upgrade".
FORMAT_VERSION = 4
_FIXED_FORMAT_VERSION = 1
_DYNAMIC_FORMAT_VERSION = 2
_STAND_IN_FORMAT_VERSION = 4
_PLAN_FORMAT_VERSION = 3


def setting(default: Any = MISSING, help: str = "") -> Any:
    """A field of a settings dataclass with its help text: the one place a setting is described
    (the CLI makes its flags from these fields, with the same defaults)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CEConfig(Ruled):
    """Which of each token's routed experts become compressed experts, and in what form.

    ``n_ce`` auxiliary experts per token are replaced by their compressed experts; the
    ``m = top_k - n_ce`` highest-weighted ones stay full ("main") experts. ``n_ce = 0``
    leaves the model's output unchanged. Instead of ``n_ce``, a per-token rule lets the number
    of main experts vary from token to token: ``top_p`` keeps the fewest heaviest experts whose
    routing weights cover that share of the token's routed weight, ``skip_below`` those whose
    weight is at least that fraction of the token's top weight (either way at least one, at
    most k); the rest are auxiliary. Exactly one of the three is given. ``form`` names one of
    :mod:`compressed_experts.forms` (:data:`~compressed_experts.forms.FORMS`); ``"none"`` gives
    the top-m baseline through the same code path, so the two are compared fairly. Whether
    ``n_ce`` fits a model is only known once the model's top-k is, so
    :func:`compressed_experts.convert` checks that part.
    """

    n_ce: int | None = setting(
        None, "Routed experts per token replaced by compressed experts (the lightest n_ce of its top-k)."
    )
    form: str = setting("ia3", "; ".join(f"{name}: {form.help}" for name, form in REGISTRY.items()) + ".")
    #: None means an eighth of the expert's (``I // 8``, at least 1). Only those forms take it.
    r: int | None = setting(
        None,
        f"Neurons per auxiliary expert ({', '.join(NEURON_FORMS)}); default an eighth of the expert's.",
    )
    top_p: float | None = setting(
        None,
        "Instead of n_ce, per token: the fewest heaviest experts whose routing weights cover this share of "
        "the token's routed weight run in full, the rest are compressed; in (0, 1], e.g. 0.6.",
    )
    skip_below: float | None = setting(
        None,
        "Instead of n_ce, per token: experts weighing less than this fraction of the token's top routing "
        "weight are compressed; in (0, 1), e.g. 0.3.",
    )
    #: Set by :func:`compressed_experts.prune` with stand-ins (not a conversion of its own: it only
    #: means something once the kept experts have been moved to the lowest ids), so no CLI flag.
    kept_experts: int | None = field(
        default=None,
        metadata={
            "help": "Pruned with stand-ins: experts below this id run in full, the removed ones are compressed.",
            "flag": False,
        },
    )

    def __post_init__(self) -> None:
        check_rule(self.n_ce, self.top_p, self.skip_below, self.kept_experts)
        form = get_form(self.form)  # raises, listing the forms
        if self.kept_experts is not None and not form.stands_in:
            raise CompressedExpertsError(
                f"form {self.form} cannot stand in for removed experts (it runs part of their own weights, which "
                f"pruning removes): use ia3 or slim",
                settings=("form",),
            )
        if self.r is not None:
            if not form.takes_r:
                raise CompressedExpertsError(
                    f"r sets the neurons of the {' and '.join(NEURON_FORMS)} forms; form {self.form} has none (leave r out)",
                    settings=("r", "form"),
                )
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
                raise CompressedExpertsError(
                    f"r must be a whole number of neurons, 1 or more; got {self.r!r}", settings=("r",)
                )

    def neurons(self, intermediate: int) -> int:
        """The ``r`` of an expert with ``intermediate`` neurons; raises if it does not fit (``1..I``)."""
        r = self.r if self.r is not None else max(1, intermediate // 8)
        if r > intermediate:
            raise CompressedExpertsError(
                f"r={r} is more neurons than the model's experts have ({intermediate}); use r between 1 and {intermediate}",
                settings=("r",),
            )
        return r

    def resolved(self, intermediate: int) -> CEConfig:
        """This config with the default ``r`` spelled out for experts of ``intermediate`` neurons.

        Converted models and their saved configs carry the resolved form, so that two configs
        that build the same blocks compare equal.
        """
        return replace(self, r=self.neurons(intermediate)) if get_form(self.form).takes_r else self

    @property
    def rule(self) -> str:
        """The rule as its setting: ``"n_ce=4"``, ``"top_p=0.6"`` or ``"skip_below=0.3"``."""
        return ", ".join(f"{name}={value}" for name, value in rule_of(self).items())

    def check_top_k(self, top_k: int) -> None:
        """Raise if this config cannot apply to a model that routes each token to ``top_k`` experts."""
        if self.n_ce is not None and self.n_ce >= top_k:
            raise CompressedExpertsError(
                f"n_ce={self.n_ce} must be smaller than the model's top-k ({top_k}): at least one "
                f"full expert must stay per token; use n_ce between 0 and {top_k - 1}",
                settings=("n_ce",),
            )

    def to_dict(self) -> dict[str, Any]:
        """The section stored under ``compressed_experts`` in a saved config.json (the rule's one
        setting, not the two left out)."""
        if self.kept_experts is not None:
            version = _STAND_IN_FORMAT_VERSION
        else:
            version = _DYNAMIC_FORMAT_VERSION if self.dynamic else _FIXED_FORMAT_VERSION
        return {**rule_of(self), "form": self.form, "r": self.r, "format_version": version}

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> CEConfig:
        """Read back what :meth:`to_dict` wrote; refuses sections from a newer format."""
        version = _format_version(section)
        if "layers" in section:
            raise CompressedExpertsError(
                "this checkpoint has settings of its own for each MoE block (a plan); this path takes one "
                "setting for all blocks: load it with compressed_experts.from_pretrained"
            )
        rules = RULES if version >= 2 else ("n_ce",)  # version 1 knows no per-token rule
        if not any(section.get(name) is not None for name in rules):
            raise CompressedExpertsError(f"the compressed_experts section of config.json has no {' or '.join(rules)}")
        # Sections written before forms existed hold the paper's vectors.
        return cls(form=section.get("form", "ia3"), r=section.get("r"), **{name: section.get(name) for name in rules})


def _format_version(section: dict[str, Any]) -> int:
    version = section.get("format_version", _FIXED_FORMAT_VERSION)
    if not isinstance(version, int):
        raise CompressedExpertsError(f"the compressed_experts section has a bad format_version: {version!r}")
    if version > FORMAT_VERSION:
        raise CompressedExpertsError(
            f"this checkpoint uses compressed-experts format {version}, newer than this "
            f"library's ({FORMAT_VERSION}): upgrade compressed-experts"
        )
    return version


#: A model's compressed-experts settings: one :class:`CEConfig` for every MoE block, or a tuple of
#: one per MoE block in model order (a plan).
Settings = CEConfig | tuple[CEConfig, ...]


def per_block(settings: Settings | list[CEConfig], blocks: int) -> tuple[CEConfig, ...]:
    """``settings`` as one config per block of a model with ``blocks`` MoE blocks; refuses a
    sequence of another length or of something else than CEConfigs."""
    if isinstance(settings, CEConfig):
        return (settings,) * blocks
    if not isinstance(settings, (list, tuple)) or not all(isinstance(c, CEConfig) for c in settings):
        raise CompressedExpertsError(
            f"settings must be a CEConfig or one CEConfig per MoE block, got {type(settings).__name__}"
        )
    if len(settings) != blocks:
        raise CompressedExpertsError(
            f"{len(settings)} settings given for a model of {blocks} MoE blocks: give one per block (or one CEConfig)",
            settings=("plan",),
        )
    return tuple(settings)


def collapsed(configs: Settings | list[CEConfig]) -> Settings:
    """One CEConfig where every block has the same, else the tuple: equal plans save and compare alike."""
    if isinstance(configs, CEConfig):
        return configs
    return configs[0] if len(set(configs)) == 1 else tuple(configs)


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """The ``compressed_experts`` section of a saved config.json for ``settings``."""
    settings = collapsed(settings)
    if isinstance(settings, CEConfig):
        return settings.to_dict()
    layers = [c.to_dict() for c in settings]
    return {"layers": layers, "format_version": max(_PLAN_FORMAT_VERSION, *(c["format_version"] for c in layers))}


def settings_from_dict(section: dict[str, Any]) -> Settings:
    """Read back what :func:`settings_to_dict` wrote; refuses sections from a newer format."""
    _format_version(section)
    layers = section.get("layers")
    if layers is None:
        return CEConfig.from_dict(section)
    if not isinstance(layers, list) or not layers or not all(isinstance(layer, dict) for layer in layers):
        raise CompressedExpertsError("the compressed_experts section's layers are not one setting per MoE block")
    return collapsed(tuple(CEConfig.from_dict(layer) for layer in layers))


#: Version of plan.json (:mod:`compressed_experts.plan` writes it).
PLAN_FORMAT = 1


def read_plan_file(path: str | os.PathLike) -> dict[str, Any]:
    """A plan.json, checked to be one: what it holds, with ``configs``, its settings per MoE block.
    Refused with what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CompressedExpertsError(f"no such plan: {path}; write one with compressed-experts plan")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != PLAN_FORMAT or not isinstance(data.get("layers"), list) or not data["layers"]:
            raise ValueError("it has no layers of a known format")
        configs = tuple(CEConfig.from_dict(layer) for layer in data["layers"])
    except (ValueError, TypeError, AttributeError, KeyError, CompressedExpertsError) as err:
        raise CompressedExpertsError(
            f"{path} is not a plan written by compressed-experts plan ({err}); write it again"
        ) from None
    return {**data, "configs": configs}


#: Weight dtypes a user may name (as transformers' ``dtype=`` takes them); "auto" keeps the saved one.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def check_dtype_name(name: str, setting: str = "dtype") -> None:
    """Refuse a dtype name before any model is built or read; the error names ``setting``, the
    setting (or parameter) that held ``name``."""
    if name not in DTYPE_NAMES:
        raise CompressedExpertsError(
            f"{setting} must be {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}, not {name!r}", settings=(setting,)
        )


#: Key of the section that a converted model's config carries, and the ``model_type`` it is
#: saved under: transformers does not know that type, so a plain ``AutoModelForCausalLM``
#: refuses the directory instead of silently loading it as the full top-k model.
SECTION = "compressed_experts"
SAVED_MODEL_TYPE = "compressed_experts"
#: Prefix of the architectures a saved config.json names (``CompressedExpertsOlmoeForCausalLM``).
ARCHITECTURE_PREFIX = "CompressedExperts"
_SAVING_CLASSES: dict[type, type] = {}


def split_saved(config_dict: dict[str, Any]) -> tuple[str, dict[str, Any], Settings]:
    """(base model type, the base family's fields, the compressed-experts settings) of a saved config.json."""
    section = config_dict.get(SECTION)
    section = dict(section) if isinstance(section, dict) else {}
    base_type = section.pop("base_model_type", None)
    if not isinstance(base_type, str):
        raise CheckpointError(f"config.json has model_type {SAVED_MODEL_TYPE!r} but no base model type")
    fields = {k: v for k, v in config_dict.items() if k not in (SECTION, "model_type")}
    return base_type, fields, settings_from_dict(section)


def saving_class(base: type) -> type:
    """A subclass of ``base`` whose serialised form carries the section under our model_type.

    In memory ``config.model_type`` stays the family's own (transformers uses it to find the
    expert weight conversions on save and load); only ``to_dict``, and so config.json, changes.
    """
    if base in _SAVING_CLASSES.values():
        return base
    if base not in _SAVING_CLASSES:

        def to_dict(self) -> dict[str, Any]:
            out = base.to_dict(self)
            if isinstance(out.get(SECTION), dict):
                out[SECTION] = {**out[SECTION], "base_model_type": out["model_type"]}
                out["model_type"] = SAVED_MODEL_TYPE
                # A name of our own: a tool that picks its model class by architecture refuses the
                # checkpoint instead of serving the base family with the compressed experts dropped.
                out["architectures"] = [
                    name if name.startswith(ARCHITECTURE_PREFIX) else ARCHITECTURE_PREFIX + name
                    for name in out.get("architectures") or ()
                ] or None
            return out

        @classmethod
        def from_pretrained(cls, source, **kwargs):
            # Read as AutoConfig reads it (the base family's fields, the section kept), not as a
            # config of another model type: PEFT calls this on save, to compare vocabulary sizes.
            config_dict, kwargs = cls.get_config_dict(source, **kwargs)
            if config_dict.get("model_type") != SAVED_MODEL_TYPE:
                return base.from_dict(config_dict, **kwargs)
            _, fields, ce = split_saved(config_dict)
            made = base.from_dict(fields, **kwargs)
            mark_config(made[0] if isinstance(made, tuple) else made, ce)
            return made

        name = f"{ARCHITECTURE_PREFIX}{base.__name__}"
        attributes = {"to_dict": to_dict, "from_pretrained": from_pretrained, "__module__": __name__}
        cls = type(name, (base,), {**attributes, "__qualname__": name})
        globals()[name] = cls  # importable by name, so a pickled config loads back
        _SAVING_CLASSES[base] = cls
    return _SAVING_CLASSES[base]


def mark_config(model_config: Any, settings: Settings) -> None:
    """Record ``settings`` in a transformers model config so that save_pretrained writes it."""
    setattr(model_config, SECTION, settings_to_dict(settings))
    model_config.__class__ = saving_class(type(model_config))
