"""Model families: one adapter per family (see base.py for what an adapter answers).

Adding a family is one file with a :class:`~vlmft.models.base.Family` subclass, listed here,
plus a tiny model in ``tests/tiny_models.py`` that the packed-isolation tests then cover.
"""

from __future__ import annotations

from .base import Family, UnsupportedModel, image_only
from .gemma3 import Gemma3
from .idefics3 import Idefics3, SmolVLM
from .internvl import InternVL
from .llava import Llava
from .llava_next import LlavaNext, LlavaOnevision
from .paligemma import PaliGemma
from .qwen_vl import Qwen35, QwenVL

FAMILIES: tuple[Family, ...] = (InternVL(), QwenVL(), Qwen35(), Llava(), LlavaNext(), LlavaOnevision(),
                                Idefics3(), SmolVLM(), Gemma3(), PaliGemma())
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_PROCESSOR = {p: f for f in FAMILIES for p in f.processor_names}

__all__ = ["FAMILIES", "Family", "Gemma3", "Idefics3", "InternVL", "Llava", "LlavaNext", "LlavaOnevision",
           "PaliGemma", "Qwen35", "QwenVL", "SmolVLM", "UnsupportedModel", "family_for", "family_of",
           "image_only", "supported_types"]


def supported_types() -> list[str]:
    return sorted(_BY_TYPE)


def family_for(model_type: str) -> Family:
    """The adapter of a config's ``model_type``; UnsupportedModel (one line) otherwise."""
    fam = _BY_TYPE.get(model_type)
    if fam is None:
        raise UnsupportedModel(f"model type '{model_type}' is not supported; vlmft trains "
                               + ", ".join(supported_types()))
    return fam


def family_of(processor) -> Family:
    """The adapter of a processor, from its class (stock or image-only, same name)."""
    for cls in type(processor).__mro__:  # the most specific class first
        fam = _BY_PROCESSOR.get(cls.__name__)
        if fam is not None:
            return fam
    raise UnsupportedModel(f"processor {type(processor).__name__} belongs to no supported family; "
                           "vlmft trains " + ", ".join(supported_types()))
