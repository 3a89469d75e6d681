"""What every model family shares, and the defaults a family file overrides.

A family answers, for its models, the questions the data stream and the training step ask:

- **processor**: the stock processor class, built image-only when it declares a video
  processor (those need torchvision); :func:`image_only`.
- **images -> tokens**: the processor's own per-image replacement text (``_process_images``,
  ``replace_image_token``, ``prepare_inputs_layout``: what ``processor(text, images)`` does
  before tokenizing), used alike by the planner (on blank images of the header size, cached)
  and by the encoder (on the decoded images), so a plan's length is the encoded length. It is
  checked once per processor against the processor's own ``__call__`` (:meth:`Family.probe`).
- **what travels with a sample**: ``vision_keys`` (per-image tensors: pixel values, grids,
  sizes, masks) and ``token_key`` (a per-token id row such as Qwen's ``mm_token_type_ids``),
  and how samples' tensors join in one packed row (:meth:`Family.join`).
- **the packed row's model inputs**: position ids (restarting 1-D ids, or Qwen's 4-row mRoPE
  ids), an attention mask where the family's own one is wrong for packed rows (Gemma 3).
- **the blank vision input** for a rank whose micro-batch has no image (:meth:`Family.blank`).
- **names**: the language tower (for the blank-input hook and gradient checkpointing) and the
  vision tower (vlmft/optim.py places parameters in towers by name).
- **tiles**: what counts as a tile for ``data.packing.num_images_expected`` and the balance
  cost, and the image-processor argument that caps tiles per image (``max_tiles_per_image``).
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref
from dataclasses import dataclass

import torch

from ..attention import takes_varlen, varlen_kwargs


class UnsupportedModel(ValueError):
    """A model type no family adapter knows, or an option a family cannot honour."""


@functools.cache
def image_only(cls: type) -> type:
    """``cls`` without its video processor: the same name and the same other arguments.

    transformers reads a processor's arguments from ``__init__.__code__`` (from_pretrained and
    save_pretrained keep only those), so the subclass gets a real ``__init__`` with the stock
    parameter list minus ``video_processor``, generated once per class."""
    if "video_processor" not in cls.get_attributes():
        return cls
    params = [p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: p.default for p in params}
    head = ", ".join(f"{p.name}=_d[{p.name!r}]" for p in params)
    call = ", ".join(f"{p.name}={p.name}" for p in params)
    src = (f"def __init__(self, {head}, **kwargs):\n"
           "    kwargs.pop('video_processor', None)\n"
           f"    _cls.__init__(self, video_processor=None, {call}, **kwargs)\n")
    scope = {"_d": defaults, "_cls": cls}
    exec(src, scope)  # noqa: S102 - generated from the class's own signature
    return type(cls.__name__, (cls,), {"__init__": scope["__init__"], "__module__": __name__,
                                        "__doc__": f"{cls.__name__} for images and text only."})


@dataclass
class Expansion:
    """A sample's images as the processor turns them into model inputs."""
    replacements: list[str]   # per image: the text its placeholder becomes
    tiles: list[int]          # per image
    vision: dict              # per-image tensors of the whole sample (pixel values, grids, ...)


def blank_image(height: int, width: int):
    from PIL import Image

    return Image.new("RGB", (max(1, width), max(1, height)), (0, 0, 0))


_PIXEL = blank_image(1, 1)   # what prepare_inputs_layout needs to count images: any image
_PLAIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plain_layout(family: "Family", processor) -> bool:
    """Whether the processor's layout step leaves a segment's text alone, so that replacing its
    placeholders by a split and a join is exact (checked on a probe, once per processor)."""
    try:
        hit = _PLAIN.get(processor)
    except TypeError:
        return False
    if hit is None:
        tok = processor.image_token
        probe, reps = f"a {tok}\nb {tok} c\n", ["<X>", "<Y>"]
        parts = probe.split(tok)
        fast = "".join(p + r for p, r in zip(parts, reps)) + parts[-1]
        hit = _PLAIN[processor] = fast == family._expand_text(processor, probe, reps)
    return hit


def cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def pad_cat(tensors: list[torch.Tensor], dim: int, pad_dims: tuple[int, ...]) -> torch.Tensor:
    """Concatenate on ``dim`` after zero-padding ``pad_dims`` to the largest size (as the
    processors pad a batch of several images)."""
    if len(tensors) == 1:
        return tensors[0]
    sizes = {d: max(t.shape[d] for t in tensors) for d in pad_dims}
    out = []
    for t in tensors:
        pad = []
        for d in reversed(range(t.dim())):
            pad += [0, sizes[d] - t.shape[d]] if d in sizes else [0, 0]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(out, dim=dim)


def restarting_positions(sample_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] position ids that restart at 0 at every sample of a packed row."""
    idx = torch.arange(sample_ids.shape[-1], device=sample_ids.device).expand_as(sample_ids)
    start = torch.ones_like(sample_ids, dtype=torch.bool)
    start[..., 1:] = sample_ids[..., 1:] != sample_ids[..., :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


def sum_tensors(obj) -> torch.Tensor | None:
    """Sum of every floating tensor in a (nested) model output; None if there is none."""
    if isinstance(obj, torch.Tensor):
        return obj.float().sum() if obj.is_floating_point() else None
    if hasattr(obj, "values") and callable(obj.values):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return None
    parts = [s for s in (sum_tensors(x) for x in items) if s is not None]
    return torch.stack(parts).sum() if parts else None


class Family:
    """Defaults: a LLaVA-style model (pixel values joined on dim 0, 1-D restarting positions,
    ``model.model.language_model``, ``model.model.vision_tower``)."""

    name = ""
    model_types: tuple[str, ...] = ()
    processor_names: tuple[str, ...] = ()   # stock processor classes of the family
    language = "language_model"     # attribute of model.model: the text tower
    vision = "vision_tower"         # attribute of model.model: the vision tower
    vision_keys: tuple[str, ...] = ("pixel_values",)
    token_key: str | None = None    # a per-token id row the model takes (mm_token_type_ids, ...)
    packing = True                  # packed rows are exact for this family
    needs_image = False             # the processor takes no sample without an image
    chat_template: str | None = None  # used when the folder has none
    video_processors: dict[str, str] = {}  # model type -> its stock video processor class (exports name it)
    tile_kwarg: str | None = None   # image-processor argument capping tiles per image

    # ------------------------------------------------------------------ processor

    def load_processor(self, path: str, model_type: str, trust_remote_code: bool = False):
        """The stock processor class (the folder's ``processor_class``, else transformers' own
        for the model type), image-only where it declares a video processor; checked once."""
        import json
        from pathlib import Path

        import transformers
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        local = Path(path) / "processor_config.json"
        name = json.loads(local.read_text()).get("processor_class") if local.is_file() else None
        if not hasattr(transformers, name or ""):
            name = PROCESSOR_MAPPING_NAMES.get(model_type)
        if name not in self.processor_names and self.processor_names:
            name = self.processor_names[0]
        cls = getattr(transformers, name)
        proc = image_only(cls).from_pretrained(path, trust_remote_code=trust_remote_code)
        if proc.chat_template is None:
            proc.chat_template = self.chat_template
        self.probe(proc)
        return proc

    def probe(self, processor) -> None:
        """Check once that :meth:`expand` and :meth:`expand_text` reproduce what the processor's
        own ``__call__`` makes of a text with one image (the transformers internals they use are
        probed, never assumed); UnsupportedModel when they do not."""
        img = blank_image(37, 53)
        text = f"a {processor.image_token} b"
        want = processor(text=[text], images=[img], add_special_tokens=False)["input_ids"][0]
        got_text = self.expand_text(processor, text, self.expand(processor, [img]).replacements)
        got = processor.tokenizer(got_text, add_special_tokens=False)["input_ids"]
        if list(want) != list(got):
            raise UnsupportedModel(
                f"{type(processor).__name__}: its image expansion differs from vlmft's reading of it "
                f"({len(got)} tokens planned, {len(want)} made); this transformers version is not supported")

    def image_token_ids(self, processor) -> set[int]:
        """Tokens of an image's expansion that are never supervised."""
        ids = getattr(processor, "image_token_ids", None)
        out = set(ids) if isinstance(ids, (list, tuple, set)) else set()
        tid = getattr(processor, "image_token_id", None)
        if isinstance(tid, int):
            out.add(tid)
        if not out:
            out.add(processor.tokenizer.convert_tokens_to_ids(processor.image_token))
        return out

    def image_kwargs(self, processor, max_tiles: int) -> dict:
        """Image-processor arguments that cap an image at ``max_tiles`` tiles (0 = default)."""
        if not max_tiles:
            return {}
        if self.tile_kwarg is None:
            raise UnsupportedModel(f"data.max_tiles_per_image: the {self.name} family has no tile limit "
                                   "to set; leave it at 0 (and max_dynamic_patch out of a meta JSON)")
        return {self.tile_kwarg: max_tiles}

    # ------------------------------------------------------------------ images -> tokens

    def expand(self, processor, images: list, max_tiles: int = 0) -> Expansion:
        """Run the processor's image path on one sample's images (PIL)."""
        merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs,
                                         return_tensors="pt", **self.image_kwargs(processor, max_tiles))
        nested, _, *_ = processor.prepare_inputs_layout(
            images=images, text=[processor.image_token * len(images)])
        processed, replacements = processor._process_images(nested, **merged["images_kwargs"])
        vision = {k: processed[k] for k in self.vision_keys if k in processed}
        vision = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in vision.items()}
        return Expansion(replacements, self.tiles(processor, processed, len(images)), vision)

    def tiles(self, processor, processed, n_images: int) -> list[int]:
        """Tiles per image: the vision tower's inputs for it (one by default)."""
        return [1] * n_images

    def expand_text(self, processor, text: str, replacements: list[str]) -> str:
        """``text`` (one segment) with its image placeholders replaced, after the processor's
        own layout step (PaliGemma adds ``<bos>`` after the images and a newline there). Where
        that step leaves the text alone (every family but PaliGemma, probed once per processor)
        the placeholders are replaced by a split and a join: the planner's hot path."""
        token = processor.image_token
        if _plain_layout(self, processor):
            parts = text.split(token)
            return "".join(p + r for p, r in zip(parts, replacements)) + parts[-1]
        return self._expand_text(processor, text, replacements)

    def _expand_text(self, processor, text: str, replacements: list[str]) -> str:
        n = text.count(processor.image_token)
        _, texts, *_ = processor.prepare_inputs_layout(images=[_PIXEL] * n, text=[text])
        out, _ = processor.get_text_with_replacements(list(texts), images_replacements=replacements)
        return out[0]

    def token_row(self, processor, ids: list[int], supervised: list[bool]) -> list[int] | None:
        """The per-token id row for ``token_key`` (None when the family has none)."""
        if self.token_key is None:
            return None
        return [int(x) for x in processor.create_mm_token_type_ids([ids])[0]]

    # ------------------------------------------------------------------ packed rows

    def join(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Join the samples' ``key`` tensors of one packed row (default: on dim 0)."""
        return cat(tensors, 0)

    def position_ids(self, model, batch: dict) -> torch.Tensor:
        """The packed row's position ids (default: restarting 1-D ids)."""
        return batch["position_ids"]

    def attention_mask(self, model, batch: dict, hidden: torch.Tensor):
        """None: transformers' own mask from restarting positions is exact for this family."""
        return None

    def model_inputs(self, model, batch: dict) -> dict:
        """Keyword arguments of ``model.model(...)`` for a packed micro-batch (host side). With a
        flash (varlen) kernel they include the row's ``cu_seq_lens_q/k`` and ``max_length_q/k``
        (vlmft/attention.py), which vlmft/forward.py hands to the language tower only."""
        kw = {"input_ids": batch["input_ids"], "position_ids": self.position_ids(model, batch)}
        kw.update(batch.get("vision") or {})
        if self.token_key and batch.get("tokens") is not None:
            kw[self.token_key] = batch["tokens"]
        if takes_varlen(model):
            kw.update(varlen_kwargs(batch["sample_ids"]))
        return kw

    def blank(self, processor) -> dict:
        """Vision inputs of one small blank image (for ranks whose micro-batch has none): 28 x 28
        pixels, which every processor resizes to its smallest input (one tile, one Qwen merge
        unit of 2 x 2 patches)."""
        return self.expand(processor, [blank_image(28, 28)]).vision

    def image_features(self, base, vision: dict) -> list:
        """The vision tower and projector run on ``vision``: the features the language model
        takes (``pooler_output``, and Qwen3-VL's ``deepstack_features``), nothing else, so the
        backward pass through them is the one real images make (ZeRO-3 reduces gradients in
        buckets as they become ready: another order on one rank hangs the collective)."""
        fn = base.get_image_features
        accepted = inspect.signature(fn).parameters
        out = fn(**{k: v for k, v in vision.items() if k in accepted})
        deep = getattr(out, "deepstack_features", None)
        return [out.pooler_output] + ([deep] if deep is not None else [])


def collapse_runs(text: str, token: str) -> tuple[str, int]:
    """``text`` with every run of ``token`` shortened to one, and the tokens so removed.
    Exact for counting when ``token`` is an added token (a run of n tokenizes to n ids)."""
    removed = 0

    def one(m):
        nonlocal removed
        removed += len(m.group(0)) // len(token) - 1
        return token

    return re.sub(f"(?:{re.escape(token)})+", one, text), removed
