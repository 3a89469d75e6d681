"""The names peft gives the parameters of a model it has put LoRA adapters into.

peft wraps layers in place (vlmft/lora.py), so a wrapped model's parameters keep their module
path with one more component::

    X.base_layer.weight          the frozen layer X that an adapter wraps
    X.lora_A.default.weight      the adapter (r x in)
    X.lora_B.default.weight      the adapter (out x r)
    M.original_module.*          the frozen original of a module to save
    M.modules_to_save.default.*  its trained copy

and the model gets peft's ``peft_config`` attribute. vlmft/optim.py reads these names (what
trains under LoRA), vlmft/lora.py writes them, vlmft/export.py undoes them.
"""

from __future__ import annotations

ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def kind(name: str) -> str:
    """What a parameter of a wrapped model is: 'adapter', 'saved' (the trained copy of a module
    to save), 'base' (the frozen layer under an adapter, or a saved module's frozen original)
    or 'other' (a weight LoRA leaves alone)."""
    parts = name.split(".")
    if any(p in ADAPTER_PARTS for p in parts):
        return "adapter"
    if "modules_to_save" in parts:
        return "saved"
    if "base_layer" in parts or "original_module" in parts:
        return "base"
    return "other"


def is_wrapped(model) -> bool:
    """True once peft has put adapters into ``model`` (it sets a ``peft_config`` dict)."""
    return isinstance(getattr(model, "peft_config", None), dict)
