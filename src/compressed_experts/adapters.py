"""A PEFT model seen as the model it stands for, without importing peft.

A PEFT model wraps the transformers model: LoRA layers gain ``lora_A``/``lora_B`` weights and
keep the original as ``base_layer``, and each ``modules_to_save`` module (the compressed experts,
``modules_to_save=["compressed"]``) is held twice, the frozen original and one trainable copy
per adapter. Parameter accounting and the vectors-only save want the model as it will be
served: the base weights, the active adapter's copy of each saved module, no adapter weights.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

_ADAPTER_WEIGHTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (``PeftModel`` and its task subclasses)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model; any other model as it is."""
    return model.get_base_model() if is_peft_model(model) else model


def _copy_in_use(wrapper: nn.Module) -> str:
    """Which child of a PEFT ``modules_to_save`` wrapper computes: ``original_module`` or an adapter's copy."""
    active = list(getattr(wrapper, "active_adapters", None) or ())
    if getattr(wrapper, "disable_adapters", False) or not active or active[0] not in wrapper.modules_to_save:
        return "original_module"
    return f"modules_to_save.{active[0]}"


def named_weights(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the model as it computes, named as its plain save would name them.

    For a PEFT model: the base model's parameters without adapter weights, each saved module's
    copy in use under the module's own name (``...experts.compressed.ce_gate``), LoRA-wrapped
    layers' weights under their own names. Other models: ``named_parameters()``.
    """
    model = base_of(model)
    in_use = {
        f"{name}.": f"{name}.{_copy_in_use(module)}."
        for name, module in model.named_modules()
        if hasattr(module, "modules_to_save") and hasattr(module, "original_module")
    }
    for name, param in model.named_parameters():
        wrapper = next((w for w in in_use if name.startswith(w)), None)
        if wrapper is not None:
            if not name.startswith(in_use[wrapper]):
                continue  # the copy not in use
            name = wrapper + name[len(in_use[wrapper]) :]
        parts = name.split(".")
        if _ADAPTER_WEIGHTS.intersection(parts):
            continue
        yield ".".join(p for p in parts if p != "base_layer"), param
