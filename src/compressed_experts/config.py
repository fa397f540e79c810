"""The compressed-experts settings, validated when built."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, replace
from typing import Any

from .errors import CheckpointError, CompressedExpertsError
from .forms import FORMS, NEURON_FORMS, get_form

__all__ = [
    "DTYPE_NAMES",
    "FORMAT_VERSION",
    "FORMS",
    "NEURON_FORMS",
    "SAVED_MODEL_TYPE",
    "SECTION",
    "CEConfig",
    "check_dtype_name",
    "mark_config",
    "setting",
]

#: Version of the ``compressed_experts`` section written into a saved model's config.json.
FORMAT_VERSION = 1


def setting(default: Any = MISSING, help: str = "") -> Any:
    """A field of a settings dataclass with its help text: the one place a setting is described
    (the CLI makes its flags from these fields, with the same defaults)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CEConfig:
    """How many of each token's routed experts become compressed experts.

    ``n_ce`` auxiliary experts per token are replaced by their compressed experts; the
    ``m = top_k - n_ce`` highest-weighted ones stay full ("main") experts. ``n_ce = 0``
    leaves the model's output unchanged. ``form`` names one of :mod:`compressed_experts.forms`
    (:data:`~compressed_experts.forms.FORMS`); ``"none"`` gives
    the top-m baseline through the same code path, so the two are compared fairly. Whether
    ``n_ce`` fits a model is only known once the model's top-k is, so
    :func:`compressed_experts.convert` checks that part.
    """

    n_ce: int
    form: str = "ia3"
    #: Intermediate neurons of an auxiliary expert in the ``subset`` and ``slim`` forms; None means
    #: an eighth of the expert's (``I // 8``, at least 1). Only those forms take it.
    r: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_ce, bool) or not isinstance(self.n_ce, int):
            raise CompressedExpertsError(f"n_ce must be a whole number, got {self.n_ce!r}", settings=("n_ce",))
        if self.n_ce < 0:
            raise CompressedExpertsError(f"n_ce must be 0 or more, got {self.n_ce}", settings=("n_ce",))
        form = get_form(self.form)  # raises, listing the forms
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

    def check_top_k(self, top_k: int) -> None:
        """Raise if this config cannot apply to a model that routes each token to ``top_k`` experts."""
        if self.n_ce >= top_k:
            raise CompressedExpertsError(
                f"n_ce={self.n_ce} must be smaller than the model's top-k ({top_k}): at least one "
                f"full expert must stay per token; use n_ce between 0 and {top_k - 1}",
                settings=("n_ce",),
            )

    def to_dict(self) -> dict[str, Any]:
        """The section stored under ``compressed_experts`` in a saved config.json."""
        return {**asdict(self), "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> CEConfig:
        """Read back what :meth:`to_dict` wrote; refuses sections from a newer format."""
        version = section.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int):
            raise CompressedExpertsError(f"the compressed_experts section has a bad format_version: {version!r}")
        if version > FORMAT_VERSION:
            raise CompressedExpertsError(
                f"this checkpoint uses compressed-experts format {version}, newer than this "
                f"library's ({FORMAT_VERSION}): upgrade compressed-experts"
            )
        if "n_ce" not in section:
            raise CompressedExpertsError("the compressed_experts section of config.json has no n_ce")
        # Sections written before forms existed hold the paper's vectors.
        return cls(n_ce=section["n_ce"], form=section.get("form", "ia3"), r=section.get("r"))


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


def split_saved(config_dict: dict[str, Any]) -> tuple[str, dict[str, Any], CEConfig]:
    """(base model type, the base family's fields, the compressed-experts settings) of a saved config.json."""
    section = config_dict.get(SECTION)
    section = dict(section) if isinstance(section, dict) else {}
    base_type = section.pop("base_model_type", None)
    if not isinstance(base_type, str):
        raise CheckpointError(f"config.json has model_type {SAVED_MODEL_TYPE!r} but no base model type")
    fields = {k: v for k, v in config_dict.items() if k not in (SECTION, "model_type")}
    return base_type, fields, CEConfig.from_dict(section)


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


def mark_config(model_config: Any, ce_config: CEConfig) -> None:
    """Record ``ce_config`` in a transformers model config so that save_pretrained writes it."""
    setattr(model_config, SECTION, ce_config.to_dict())
    model_config.__class__ = saving_class(type(model_config))
