"""Turn a conversation record into token ids and labels with the model's own chat template.

Labels: exactly the assistant turns' content and their end-of-turn token are supervised; the
system, user and template text, the newline after end-of-turn, and every image token are not.
The spans come from the template itself: for assistant turn i, the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])`` (trailing
whitespace cut) is that turn's answer. This works for any prefix-stable template (ChatML as in
InternVL and Qwen, Llama, ...) and is checked, not assumed.

The result is a list of segments (text, supervised or not, the images whose placeholders it
holds); tokens.py turns them into token counts (the plan) and token ids (the encoding) through
the model family's processor.

Speed (planning 100k samples takes seconds, not minutes). A conversation's *shape* (roles, and
the text/image layout of each turn) is rendered once with sentinel texts, for the full chat and
for every prefix the spans need. The sentinels hold characters that escaping or JSON would
change, and they note any use other than being output (a method call, a comparison, a length,
iteration, ...). For a shape whose sentinels come out intact and untouched the template only
copies the texts, so a sample's segments are the skeleton's pieces with its texts put in: no
render at all. Otherwise, when the sentinels at least come out intact, each sample is rendered
once and must equal the filled skeleton, or it takes the slow path (every prefix rendered), so
a template that edits or inspects content is never guessed at. The compiled Jinja template is
called directly, as ``apply_chat_template`` calls it, after checking once that both agree.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .sources import PLACEHOLDER, ROLES, BadSample, turns  # noqa: F401  (re-exported)

_NASTY = " \t\"'\\<&>{%#}\n"
_SENTINEL = re.compile("\ue000(\\d+)" + re.escape(_NASTY) + "\ue001")


@dataclass
class Segment:
    text: str
    supervised: bool
    images: list[str | Path] = field(default_factory=list)


def messages(record: dict, image_root: str | Path) -> tuple[list[dict], list[str]]:
    """LLaVA/InternVL record -> chat messages (content lists with image items) and image paths
    (image_root joined with each relative path)."""
    ts, imgs = turns(record)
    return _messages(ts), _paths(image_root, imgs)


def _messages(ts) -> list[dict]:
    return [{"role": role, "content": [{"type": "image"} if c is None else {"type": "text", "text": c}
                                       for c in content]} for role, content in ts]


def _paths(image_root, imgs: list[str]) -> list[str]:
    root = str(image_root)
    return [os.path.join(root, p) for p in imgs]   # an absolute p stays as it is


# ---------------------------------------------------------------- rendering

class _Traced(str):
    """A sentinel text that notes (``_Traced.touched``) any use but being output as it is."""
    touched = False

    def __str__(self):   # str(x) in a filter keeps tracing; output joins it verbatim
        return self


def _touch(name):
    method = getattr(str, name)

    def touched(self, *args, **kwargs):
        _Traced.touched = True
        return method(self, *args, **kwargs)
    return touched


for _name in [n for n in dir(str) if not n.startswith("_")] + [
        "__contains__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__",
        "__len__", "__getitem__", "__iter__", "__add__", "__mul__", "__rmul__", "__mod__",
        "__rmod__", "__format__"]:
    setattr(_Traced, _name, _touch(_name))
_Traced.__int__ = _Traced.__float__ = _Traced.__index__ = _touch("__len__")  # flag, then fail later
_LOCK = threading.Lock()


class _Fast:
    """Per-processor caches: the compiled template, shapes, image token counts, token counts."""

    def __init__(self, processor):
        self.template = self.base = None
        self.shapes: dict[tuple, tuple] = {}
        self.text_cache: dict[str, int] = {}
        self.image_token = processor.image_token
        try:  # the same call apply_chat_template makes, minus its per-call conversions
            from transformers.utils.chat_template_utils import _compile_jinja_template

            t = self.template = _compile_jinja_template(processor._resolve_chat_template(None))
            self.base = {**t.globals, "tools": None, "documents": None,
                         **{k: v for k, v in processor.tokenizer.special_tokens_map.items()
                            if isinstance(v, (str, list))}}
            probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " a\n"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "b "}]}]
            if any(self.render(probe, g) != template_text(processor, probe, g) for g in (False, True)):
                self.template = None
        except Exception:
            self.template = None

    def render(self, msgs, gen):
        """``template.render(messages=..., ...)`` without its per-call merge of the globals."""
        t = self.template
        env = t.environment
        ctx = env.context_class(env, {**self.base, "messages": msgs, "add_generation_prompt": gen},
                                t.name, t.blocks)
        return env.concat(t.root_render_func(ctx))

    def shape(self, shape: tuple) -> tuple:
        """(skeleton or None, blind segments or None) of a conversation shape."""
        hit = self.shapes.get(shape)
        if hit is None:
            with _LOCK:
                try:
                    hit = _skeleton(self, shape)
                except Exception:   # the template refused the sentinel chat: per sample, slowly
                    hit = (None, None)
            self.shapes[shape] = hit
        return hit


_FAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fast(processor) -> _Fast:
    try:
        f = _FAST.get(processor)
    except TypeError:  # not weak-referenceable: no caching
        return _Fast(processor)
    if f is None:
        f = _FAST[processor] = _Fast(processor)
    return f


def template_text(processor, msgs, gen=False) -> str:
    """The chat template's text for ``msgs`` (images as the processor's image token), with the
    assistant's generation prompt when ``gen``: the template's own rendering, every call."""
    # ProcessorMixin's own method: SmolVLM's override reads its video processor, which an
    # image-only processor does not have
    from transformers.processing_utils import ProcessorMixin

    return ProcessorMixin.apply_chat_template(processor, msgs, tokenize=False, add_generation_prompt=gen)


def _sent(k: int) -> str:
    return f"\ue000{k}{_NASTY}\ue001"


def _pieces(rendered: str, expect: int | None = None) -> list | None:
    """Split a sentinel render into literal strings and text indices; None unless the texts
    ``0..expect-1`` each appear once, in order, and no sentinel was cut or altered."""
    parts = _SENTINEL.split(rendered)
    if expect is not None and [int(x) for x in parts[1::2]] != list(range(expect)):
        return None
    if any("\ue000" in p or "\ue001" in p for p in parts[::2]):
        return None
    return [int(p) if k % 2 else p for k, p in enumerate(parts) if p or k % 2]


def _fill(pieces: list, texts: list[str]) -> str:
    return "".join([texts[p] if type(p) is int else p for p in pieces])


def _skeleton(fast: _Fast, shape: tuple) -> tuple:
    """Render a shape with traced sentinel texts: the full chat and the prefixes the spans need
    (``skeleton``); and, when the template only copied the texts, the segments as pieces."""
    sk, n, counts = [], 0, []
    for role, layout in shape:
        content = []
        for is_image in layout:
            content.append({"type": "image"} if is_image else {"type": "text", "text": _Traced(_sent(n))})
            n += not is_image
        sk.append({"role": role, "content": content})
        counts.append(n)
    _Traced.touched = False
    full_s = fast.render(sk, False)
    full = _pieces(full_s, n)
    prefixes = {}
    for i, (role, _) in enumerate(shape):
        for j, gen in ((i, True), (i + 1, False)) if role == "assistant" and full else ():
            if j and (j, gen) not in prefixes:
                prefixes[j, gen] = _pieces(fast.render(sk[:j], gen), counts[j - 1])
    if full is None or None in prefixes.values():
        return None, None
    if _Traced.touched:
        return {"full": full, "prefixes": prefixes}, None
    sents = [_sent(k) for k in range(n)]
    try:
        parts = _split(full_s, lambda j, gen: _fill(prefixes[j, gen], sents), [r for r, _ in shape])
    except BadSample:
        return None, None
    blind = []
    for text, sup in parts:
        pieces = _pieces(text)
        if pieces is None or (sup and text.endswith("\ue001")):
            # a cut inside a text, or the span's end would move with the text's trailing spaces
            return {"full": full, "prefixes": prefixes}, None
        n_img = sum(p.count(fast.image_token) for p in pieces if type(p) is str)
        blind.append((sup, pieces, n_img))
    return {"full": full, "prefixes": prefixes}, blind


def _split(full: str, render, roles: list[str]) -> list[tuple[str, bool]]:
    """The full render cut into (text, supervised) at each assistant span (empty ones left out)."""
    cuts, pos = [], 0
    for i, role in enumerate(roles):
        if role != "assistant":
            continue
        start = len(render(i, True)) if i else 0
        turn = render(i + 1, False).rstrip()
        if start < pos or len(turn) > len(full) or not full.startswith(turn):
            raise BadSample("template", "the chat template is not prefix-stable; cannot find the "
                            "assistant spans (please report the model)")
        cuts.append((start, len(turn)))
        pos = len(turn)
    out, pos = [], 0
    for s, e in cuts + [(len(full), len(full))]:
        out += [(full[pos:s], False), (full[s:e], True)]
        pos = e
    return [(t, sup) for t, sup in out if t]


def _attach(parts, paths: list, token: str, counts=None) -> list[Segment]:
    """Segments with their images: as many paths as image tokens in each text, in order."""
    out, k = [], 0
    for n, (text, sup) in zip(counts or (text.count(token) for text, _ in parts), parts):
        if text:
            if counts is not None and text.count(token) != n or k + n > len(paths):
                raise BadSample("image_count_mismatch", f"a text holds the image token {token!r}")
            out.append(Segment(text, sup, paths[k:k + n]))
            k += n
    if k != len(paths):
        raise BadSample("image_count_mismatch", f"the chat template wrote {k} image tokens for {len(paths)} images")
    return out


def sample_segments(processor, record: dict, image_root: str | Path) -> list[Segment]:
    """A record's segments: from its shape's pieces when the template only copies texts, else
    through :func:`segments`. BadSample when the record is unusable."""
    ts, imgs = turns(record)
    paths = _paths(image_root, imgs)
    fast = _fast(processor)
    blind = fast.template is not None and fast.shape(tuple(
        (role, tuple(c is None for c in content)) for role, content in ts))[1]
    if not blind:
        return segments(processor, _messages(ts), paths)
    texts = [c for _, content in ts for c in content if c is not None]
    parts = [("".join([texts[p] if type(p) is int else p for p in pieces]), sup) for sup, pieces, _ in blind]
    return _attach(parts, paths, fast.image_token, [n for _, _, n in blind])


def segments(processor, msgs: list[dict], paths: list[str | Path]) -> list[Segment]:
    """Split the rendered conversation into supervised / unsupervised text, images attached."""
    fast = _fast(processor)
    render = None
    if fast.template is not None:
        sk = fast.shape(tuple((m["role"], tuple(c["type"] == "image" for c in m["content"]))
                              for m in msgs))[0]
        if sk is not None:
            texts = [c["text"] for m in msgs for c in m["content"] if c["type"] == "text"]
            full = _fill(sk["full"], texts)
            if full == fast.render(msgs, False):   # the skeleton holds for this sample
                render = lambda j, gen: _fill(sk["prefixes"][j, gen], texts)  # noqa: E731
    if render is None:
        full = template_text(processor, msgs)
        render = lambda j, gen: template_text(processor, msgs[:j], gen)  # noqa: E731
    return _attach(_split(full, render, [m["role"] for m in msgs]), list(paths), processor.image_token)
