"""Parameter groups for AdamW: freezing, no-decay, layer-wise LR decay, LR multipliers.

:func:`plan` gives every parameter one :class:`ParamRow`. The rules run in this order; each
row's ``reason`` says which ones applied.

1. **Placement.** The parameter's full name puts it in a tower: the first path component that
   names a tower wins, checked tower by tower in this order:
   ``head`` (a component ``lm_head``), ``projector`` (a component containing ``projector``,
   ``merger`` or ``connector``, or ``mlp1``, ``image_newline``), ``vision`` (containing
   ``vision``/``visual``, or ``vit``), ``language`` (containing ``language``/``text``, or
   ``llm``). The tower's root is the name up to that component. This covers
   ========================  ===========================  =================================  ===============================
   family                    vision                       projector                          language
   ========================  ===========================  =================================  ===============================
   InternVL (HF)             model.vision_tower           model.multi_modal_projector        model.language_model
   Qwen2-VL / Qwen2.5-VL     model.visual                 model.visual.merger                model.language_model
   LLaVA(-Next)              model.vision_tower           model.multi_modal_projector        model.language_model
   Idefics3 / SmolVLM        model.vision_model           model.connector                    model.text_model
   InternVL (remote code)    vision_model                 mlp1                               language_model
   ========================  ===========================  =================================  ===============================
   and ``lm_head`` is the head. A parameter that no rule places is an error naming it. The
   components peft adds (``base_layer``, ``lora_A``/``lora_B``, ``default``,
   ``modules_to_save``, ``original_module``, a ``base_model.model.`` prefix) name no tower, so an
   adapter sits in the tower and block of the layer it wraps (vlmft/peft_names.py).
   **Layer ids** inside the vision and language towers: block ``i`` (the first ``layers.i``,
   ``blocks.i``, ``layer.i`` or ``h.i`` after the root) gets ``i + 1``; parameters registered
   before the first block (embeddings, patch/position embeddings, class token, a pre-block norm)
   get ``0``; the rest (final norm, post-layernorm) get ``top = n_blocks + 1``. The projector
   gets the vision tower's ``top`` (it sits just above the last vision block) and the head the
   language tower's ``top`` (beside the final norm).
2. **Freezing** (``optim.freeze``) decides the trainable set: ``vision``/``projector``/
   ``language`` (embeddings, blocks and final norm)/``lm_head`` freeze their tower;
   ``vision_first_layers: N`` freezes vision layer ids ``0..N`` (embeddings and the first N
   blocks), ``vision_last_layers: N`` freezes the last N blocks (ids ``n-N+1..n``; the
   post-norm stays trainable). A head tied to the input embeddings is one tensor, listed once
   under the embeddings: it follows ``freeze.language``; ``freeze.lm_head`` without
   ``freeze.language`` on a tied model is an error (it cannot be done). **Under LoRA** (a
   model peft has wrapped) only the adapters and the trained copies of ``lora.modules_to_save``
   can train; the flags still act on them, and a whole-tower flag that would freeze them is an
   error.
3. **Weight decay** ``optim.weight_decay``, except (the first that applies is the reason):
   biases; norms (the owning module's class name contains ``Norm``, or a path component
   contains ``norm`` or starts with ``ln_``); position embeddings; class tokens (``cls_token``,
   ``class_embedding``); layer scales (``lambda_1/2``, ``gamma``, ``ls1/ls2``); embeddings
   (``nn.Embedding`` weights and any name containing ``embed``, patch embeddings included);
   any other tensor with ndim <= 1; ``optim.no_decay`` globs; names from a module's
   ``no_weight_decay()`` (timm convention, relative to that module).
4. **Layer-wise LR decay**: ``lr_scale = rate ** (top - layer_id)`` with ``rate`` =
   ``optim.layer_decay.vision`` / ``.language`` for that tower (1.0 = off); projector and head
   are at their ``top``, so their scale is 1.
5. **LR multipliers**: every ``optim.lr_multipliers`` glob (fnmatch over full names, tied
   aliases included) that matches multiplies ``lr_scale``. A pattern in ``lr_multipliers`` or
   ``no_decay`` that matches no parameter is an error with a did-you-mean.
6. **Groups**: trainable parameters with equal ``(lr_scale, weight_decay)`` share one group
   (first-seen order), so DeepSpeed sees few groups; each trainable parameter is in exactly one
   group (checked). ``plan`` never touches ``requires_grad``; :func:`apply_freeze` does.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from .peft_names import is_wrapped, kind
from .recipe import FreezeConfig, OptimConfig, RecipeError

TOWERS = ("vision", "projector", "language", "head")
_TOWER_RULES = (
    ("head", lambda c: c == "lm_head"),
    ("projector", lambda c: any(k in c for k in ("projector", "merger", "connector"))
     or c in ("mlp1", "image_newline")),
    ("vision", lambda c: "vision" in c or "visual" in c or c == "vit"),
    ("language", lambda c: "language" in c or "text" in c or c == "llm"),
)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|blocks|layer|h)\.(\d+)(?:\.|$)")
_LAYER_SCALES = {"lambda_1", "lambda_2", "gamma", "gamma_1", "gamma_2", "ls1", "ls2"}


@dataclass
class ParamRow:
    name: str
    module: str            # class name of the owning module
    shape: tuple
    numel: int
    tower: str | None      # 'vision' | 'projector' | 'language' | 'head'
    layer_id: int | None
    lr_scale: float
    weight_decay: float
    frozen: bool
    group: int | None      # index into the groups of plan(); None if frozen
    reason: str
    lora: str | None = None  # under LoRA: 'adapter' | 'saved' | 'base' | 'other' (peft_names.kind)


def group_name(index: int, group: dict) -> str:
    kind = "decay" if group["weight_decay"] > 0 else "no_decay"
    return f"g{index} {kind} x{group['lr_scale']:.6g}"


def place(name: str) -> tuple[str | None, str | None]:
    """(tower, root) for a full parameter name; (None, None) if no rule names a tower."""
    parts = name.split(".")[:-1]
    for tower, rule in _TOWER_RULES:
        for i, comp in enumerate(parts):
            if rule(comp):
                return tower, ".".join(parts[: i + 1])
    leaf = name.rsplit(".", 1)[-1]  # a parameter held by the model itself (LLaVA-NeXT's image_newline)
    for tower, rule in _TOWER_RULES:
        if rule(leaf):
            return tower, name
    return None, None


def _shape(p) -> torch.Size:
    """The parameter's full shape, also when ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(p, "ds_shape", None) or p.shape


def _no_decay_reason(name, p, owner, aliases, user_globs, model_nwd) -> str | None:
    parts = name.split(".")
    leaf, comps = parts[-1], parts[:-1]
    if leaf == "bias":
        return "bias"
    if "Norm" in type(owner).__name__:
        return f"norm ({type(owner).__name__})"
    if any("norm" in c.lower() or re.match(r"ln(_|\d|$)", c) for c in comps):
        return "norm (by name)"
    if "pos_embed" in name or "position_embedding" in name:
        return "position embedding"
    if leaf in ("cls_token", "class_embedding", "class_token"):
        return "class token"
    if leaf in _LAYER_SCALES or (comps and comps[-1] in ("ls1", "ls2")):
        return "layer scale"
    if isinstance(owner, nn.Embedding) or "embed" in name:
        return "embedding"
    if len(_shape(p)) <= 1:
        return "1-D"
    for pat in user_globs:
        if any(fnmatch.fnmatchcase(a, pat) for a in aliases):
            return f"optim.no_decay '{pat}'"
    if any(a == n or a.startswith(n + ".") for a in aliases for n in model_nwd):
        return "model no_weight_decay()"
    return None


def _suggest(pattern: str, names: list[str]) -> str:
    """A did-you-mean for a glob that matched nothing: fix each word to the closest name part."""
    comps = sorted({c for n in names for c in n.split(".") if not c.isdigit()})
    fixed = pattern
    for tok in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", pattern):
        if tok not in comps:
            near = difflib.get_close_matches(tok, comps, n=1, cutoff=0.6)
            if not near:
                near = [c for c in comps if tok in c][:1]
            if near:
                fixed = fixed.replace(tok, near[0])
    if fixed != pattern and any(fnmatch.fnmatchcase(n, fixed) for n in names):
        return f"did you mean '{fixed}'?"
    roots = sorted({".".join(n.split(".")[:2]) for n in names})[:6]
    near = difflib.get_close_matches(pattern, names, n=2, cutoff=0.5)
    return ("close names: " + ", ".join(near) if near else
            "names look like " + ", ".join(f"'{r}.*'" for r in roots)) + " (fnmatch over full names)"


def plan(model: nn.Module, optim: OptimConfig) -> tuple[list[ParamRow], list[dict]]:
    """Rows for every parameter (in ``named_parameters`` order) and the optimizer groups
    ``{"names", "lr_scale", "weight_decay", "name"}``. Raises RecipeError (a ValueError) listing
    every recipe problem, ValueError for parameters no rule can place. The rules of the module
    docstring, one function each: placement and layer ids, freezing, the rows (no-decay,
    layer-wise decay, multipliers), the groups."""
    named = list(model.named_parameters())
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    towers = _Towers(named)
    errors: list[str] = []
    frozen_by, tied_head = _freeze_rule(optim.freeze, towers, named, aliases, errors)
    if is_wrapped(model):
        frozen_by = _lora_rule(frozen_by, errors)
    rows = _rows(model, optim, towers, named, aliases, frozen_by, tied_head, errors)
    if errors:
        raise RecipeError(errors, "optim")
    groups = _groups(rows)
    check_groups(rows, groups)
    return rows, groups


class _Towers:
    """1. Placement and layer ids (see the module docstring)."""

    def __init__(self, named: list):
        self.placed = {n: place(n) for n, _ in named}
        unplaced = [n for n, (t, _) in self.placed.items() if t is None]
        if unplaced:
            raise ValueError(f"{len(unplaced)} parameter(s) no rule can place in a tower "
                             f"({'/'.join(TOWERS)}); vlmft does not know this model's layout: "
                             + ", ".join(unplaced[:10]) + (" ..." if len(unplaced) > 10 else ""))
        self.blocks: dict[str, int] = {}       # root -> number of blocks
        self.first_block: dict[str, int] = {}  # root -> index (in named) of its first block parameter
        self.count = len(named)
        for i, (n, _) in enumerate(named):
            tower, root = self.placed[n]
            m = _BLOCK.search(n[len(root) + 1:]) if tower in ("vision", "language") else None
            if m:
                self.blocks[root] = max(self.blocks.get(root, 0), int(m.group(1)) + 1)
                self.first_block.setdefault(root, i)
        self.tower_of = {root: tower for tower, root in self.placed.values()}
        self.top = {"vision": 0, "language": 0}
        for root, tower in self.tower_of.items():
            if tower in self.top:
                self.top[tower] = max(self.top[tower], self.blocks.get(root, 0) + 1)
        self.n_vision = max((nb for r, nb in self.blocks.items() if self.tower_of[r] == "vision"), default=0)

    def layer_of(self, i: int, n: str) -> int:
        tower, root = self.placed[n]
        if tower == "projector":
            return self.top["vision"]
        if tower == "head":
            return self.top["language"]
        m = _BLOCK.search(n[len(root) + 1:])
        if m:
            return int(m.group(1)) + 1
        return 0 if i < self.first_block.get(root, self.count) else self.blocks.get(root, 0) + 1


def _freeze_rule(f: FreezeConfig, towers: _Towers, named: list, aliases: dict, errors: list[str]):
    """2. Freezing: (tower, layer id, tied) -> the flag that freezes it or None; and the ids of
    parameters that are the (tied) output head too."""
    n_vis = towers.n_vision
    for key, v in (("vision_first_layers", f.vision_first_layers),
                   ("vision_last_layers", f.vision_last_layers)):
        if v > n_vis:
            errors.append(f"optim.freeze.{key}: {v}, but the vision tower has {n_vis} blocks")
    tied_head = {id(p) for n, p in named if any(a.split(".")[0] == "lm_head" or ".lm_head." in a
                                               for a in aliases[id(p)][1:])}
    if tied_head and f.lm_head and not f.language:
        errors.append("optim.freeze.lm_head: this model's output head is tied to the input "
                      "embeddings (one tensor, which follows optim.freeze.language); freeze "
                      "both or neither")

    def frozen_by(tower, lid, tied, name=None):
        if tower == "vision":
            if f.vision:
                return "optim.freeze.vision"
            if f.vision_first_layers and lid <= f.vision_first_layers:
                return "optim.freeze.vision_first_layers"
            if f.vision_last_layers and n_vis - f.vision_last_layers < lid <= n_vis:
                return "optim.freeze.vision_last_layers"
        if tower == "projector" and f.projector:
            return "optim.freeze.projector"
        if tower == "language" and f.language:
            return "optim.freeze.language" + (" (the tied lm_head with it)" if tied else "")
        if tower == "head" and f.lm_head:
            return "optim.freeze.lm_head"
        return None

    return frozen_by, tied_head


_WHOLE_TOWER = ("optim.freeze.vision", "optim.freeze.projector", "optim.freeze.language",
                "optim.freeze.lm_head")


def _lora_rule(frozen_by, errors: list[str]):
    """2b. Under LoRA (a model peft has wrapped, vlmft/lora.py): only the adapters and the
    trained copies of lora.modules_to_save can train; the freeze flags still act on those
    (``vision_first_layers`` leaves the adapters of those blocks frozen); a flag that freezes a
    whole tower's adapters or saved modules contradicts the lora section and is an error."""
    said: set[str] = set()

    def rule(tower, lid, tied, name):
        k = kind(name)
        if k == "base":
            return "lora (the frozen layer under an adapter, or a saved module's original)"
        if k == "other":
            return "lora (not a lora target, not in lora.modules_to_save)"
        why = frozen_by(tower, lid, tied, name)
        flag = why.split(" ")[0] if why else None
        if flag in _WHOLE_TOWER and flag not in said:
            said.add(flag)
            what = "LoRA adapters" if k == "adapter" else "lora.modules_to_save copies"
            errors.append(f"{flag}: freezes the {what} in that tower ({name}); remove the flag "
                          "or that tower's lora entries")
        return why

    return rule


def _rows(model, optim: OptimConfig, towers: _Towers, named, aliases, frozen_by, tied_head,
          errors: list[str]) -> list[ParamRow]:
    """3.-5. One row per parameter: frozen or not, no-decay reason, layer-wise LR, multipliers."""
    modules = dict(model.named_modules(remove_duplicate=False))
    model_nwd = set()
    for mname, mod in modules.items():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            model_nwd |= {f"{mname}.{k}" if mname else k for k in fn()}
    rate = {"vision": optim.layer_decay.vision, "language": optim.layer_decay.language}
    used_mult = dict.fromkeys(optim.lr_multipliers, False)
    used_nd = dict.fromkeys(optim.no_decay, False)
    rows: list[ParamRow] = []
    for i, (n, p) in enumerate(named):
        tower, _ = towers.placed[n]
        al = aliases[id(p)]
        owner = modules[n.rsplit(".", 1)[0]] if "." in n else model
        lid = towers.layer_of(i, n)
        why = frozen_by(tower, lid, id(p) in tied_head, n)
        lora = kind(n) if is_wrapped(model) else None
        reasons = [f"frozen: {why}"] if why else []
        if lora in ("adapter", "saved") and not why:
            reasons.append("lora adapter" if lora == "adapter" else "lora.modules_to_save")
        if id(p) in tied_head:
            reasons.append("tied: also " + ", ".join(al[1:]))
        for pat in used_nd:
            used_nd[pat] |= any(fnmatch.fnmatchcase(a, pat) for a in al)
        nd = _no_decay_reason(n, p, owner, al, optim.no_decay, model_nwd)
        reasons.append(f"no decay: {nd}" if nd else "decay")
        top = towers.top.get(tower, 0)
        scale = rate[tower] ** (top - lid) if tower in rate else 1.0
        if tower in rate and rate[tower] != 1.0:
            reasons.append(f"layer decay {rate[tower]}^{top - lid}")
        for pat, mult in optim.lr_multipliers.items():
            if any(fnmatch.fnmatchcase(a, pat) for a in al):
                used_mult[pat] = True
                scale *= mult
                reasons.append(f"lr x{mult:g} ({pat})")
        rows.append(ParamRow(n, type(owner).__name__, _shape(p), _shape(p).numel(), tower, lid, float(scale),
                             0.0 if nd else float(optim.weight_decay), why is not None, None, "; ".join(reasons),
                             lora))
    names = [a for al in aliases.values() for a in al]
    errors += [f"optim.lr_multipliers.{pat}: pattern matches no parameter; " + _suggest(pat, names)
               for pat, hit in used_mult.items() if not hit]
    errors += [f"optim.no_decay[{k}]: pattern '{pat}' matches no parameter; " + _suggest(pat, names)
               for k, (pat, hit) in enumerate(used_nd.items()) if not hit]
    return rows


def _groups(rows: list[ParamRow]) -> list[dict]:
    """6. Trainable parameters with equal (lr_scale, weight_decay) share a group, first-seen order."""
    groups: list[dict] = []
    index: dict[tuple, int] = {}
    for r in rows:
        if r.frozen:
            continue
        key = (round(r.lr_scale, 12), r.weight_decay)
        if key not in index:
            index[key] = len(groups)
            groups.append({"names": [], "lr_scale": r.lr_scale, "weight_decay": r.weight_decay})
        r.group = index[key]
        groups[r.group]["names"].append(r.name)
    for i, g in enumerate(groups):
        g["name"] = group_name(i, g)
    return groups


def check_groups(rows: list[ParamRow], groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, no frozen one in any (torchtitan-style)."""
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        for n in g["names"]:
            assert n not in seen, f"{n} is in groups {seen[n]} and {i}"
            seen[n] = i
    trainable = {r.name: r.group for r in rows if not r.frozen}
    missing = set(trainable) - set(seen)
    extra = set(seen) - set(trainable)
    assert not missing and not extra, f"not grouped: {sorted(missing)[:5]}; frozen but grouped: {sorted(extra)[:5]}"
    assert all(seen[n] == gi for n, gi in trainable.items()), "row.group disagrees with groups"


def apply_freeze(model: nn.Module, rows: list[ParamRow]) -> None:
    """Set ``requires_grad`` of every parameter from the rows (frozen -> False, else True)."""
    frozen = {r.name: r.frozen for r in rows}
    for n, p in model.named_parameters():
        p.requires_grad_(not frozen[n])


def build_optimizer(model: nn.Module, optim: OptimConfig) -> tuple[torch.optim.AdamW, list[ParamRow]]:
    """Freeze, then a torch AdamW whose groups carry ``lr`` (= optim.lr x lr_scale), ``lr_scale``,
    ``weight_decay`` and ``name``; the schedule scales each group's lr by the same factor."""
    rows, groups = plan(model, optim)
    if not groups:
        raise RecipeError(["optim.freeze: every parameter is frozen; nothing to train"], "optim")
    apply_freeze(model, rows)
    params = dict(model.named_parameters())
    param_groups = [{"params": [params[n] for n in g["names"]], "lr": optim.lr * g["lr_scale"],
                     "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"], "name": g["name"]}
                    for g in groups]
    grouped = [id(p) for g in param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, \
        "every trainable parameter must be in exactly one optimizer group"
    opt = torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                            weight_decay=optim.weight_decay, fused=False)
    return opt, rows
