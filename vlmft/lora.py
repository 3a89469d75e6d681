"""LoRA through peft: which modules get adapters, the wrap, and what each parameter then is.

**Resolving** (:func:`resolve`) needs module names and classes only, so it runs on the
meta-device model of :func:`vlmft.model.meta_model` before any weight is read. A module's tower
is the tower :func:`vlmft.optim.place` gives its parameters (the same rule ``lr-table`` shows).
For each tower of ``lora.targets``:

- ``linear`` is every ``nn.Linear`` of that tower;
- any other entry is a glob over full module names, which also matches a name's last
  components (``q_proj`` matches every ``….q_proj``, as peft's suffix match does). It selects
  modules of its own tower only: ``targets.language: [q_proj]`` never reaches the vision tower's
  ``q_proj``. Nothing reaches a tower whose list is empty.

Problems, one line each, all collected: a glob that matches nothing in its tower (naming the
tower it does match in, if any); a glob that matches a layer that is not an ``nn.Linear`` (a
Conv patch embedding, an embedding, a norm: peft's LoRA layers here wrap ``nn.Linear`` only);
a glob that matches only containers (``self_attn``: name its layers).

``lora.modules_to_save`` entries are tower names (``projector``, ``vision``, ``language``,
``head``: the tower's root modules) or globs as above over any tower; the outermost matching
module is saved. Refused: an entry that matches nothing or a module without parameters, a
module that holds (or is) an adapter target, a module whose weight is tied to another (a
trained copy would untie them).

**Wrapping** (:func:`apply`) is peft's ``inject_adapter_in_model`` with the resolved exact
names: in place, so the HF model object stays the one that vlmft/forward.py runs and
vlmft/checkpoint.py exports; its parameters then carry peft's names (vlmft/peft_names.py), and
vlmft/optim.py freezes everything but the adapters and the saved copies.

**QLoRA** (:func:`quantization`): the config transformers loads the frozen language model with
in 4-bit NF4 (bitsandbytes); only with CUDA and bitsandbytes present, else one line. No test
here runs the 4-bit kernels (there is no GPU); the rest of the path is the one above.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .optim import place
from .recipe import LoraConfig, RecipeError

TOWERS = ("language", "vision", "projector")
SAVE_TOWERS = ("projector", "vision", "language", "head")
MAX_LINES = 5  # problem lines per glob before "... and N more"
INIT = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}


@dataclass
class Targets:
    """The resolved module names: adapter targets per tower, and the modules to save."""
    modules: dict[str, list[str]] = field(default_factory=dict)  # tower -> target module names
    saved: list[str] = field(default_factory=list)
    unquantized: list[str] = field(default_factory=list)  # QLoRA: modules kept out of 4-bit

    def all(self) -> list[str]:
        return [n for tower in TOWERS for n in self.modules.get(tower, [])]


def _matches(name: str, glob: str) -> bool:
    return fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(name, "*." + glob)


def _tower_of(model: nn.Module) -> dict[str, str | None]:
    """Module name -> its tower (place() of a parameter directly under it)."""
    return {n: place(f"{n}.weight")[0] if n else None for n, _ in model.named_modules()}


def _own_params(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters(recurse=False))


def _glob_targets(glob: str, tower: str, key: str, modules: dict, towers: dict,
                  errors: list[str]) -> list[str]:
    """The nn.Linear layers of ``tower`` that one entry of lora.targets.<tower> selects."""
    if glob == "linear":
        hit = [n for n, m in modules.items() if towers[n] == tower and isinstance(m, nn.Linear)]
        if not hit:
            errors.append(f"{key}: 'linear': the {tower} tower has no nn.Linear layer")
        return hit
    matched = [n for n in modules if n and _matches(n, glob)]
    mine = [n for n in matched if towers[n] == tower]
    layers = [n for n in mine if _own_params(modules[n])]
    bad = [n for n in layers if not isinstance(modules[n], nn.Linear)]
    for n in bad[:MAX_LINES]:
        errors.append(f"{key}: '{glob}' matches {n} ({type(modules[n]).__name__}); LoRA adapters "
                      "wrap nn.Linear layers only: narrow the glob, or train the layer fully "
                      "with lora.modules_to_save")
    if len(bad) > MAX_LINES:
        errors.append(f"{key}: '{glob}' matches {len(bad) - MAX_LINES} more layers that are not nn.Linear")
    if bad:
        return []
    if not mine:
        elsewhere = sorted({towers[n] for n in matched if towers[n]})
        hint = (f"it matches modules of the {' and '.join(elsewhere)} tower (e.g. {matched[0]}); put it "
                f"under lora.targets.{elsewhere[0]}" if elsewhere and elsewhere[0] in TOWERS else
                "globs are over full module names (see vlmft lr-table) or their last components")
        errors.append(f"{key}: '{glob}' matches no module of the {tower} tower; {hint}")
        return []
    if not layers:
        errors.append(f"{key}: '{glob}' matches only containers ({mine[0]}: "
                      f"{type(modules[mine[0]]).__name__}); name their layers, e.g. '{glob}.*'")
    return layers


def _roots(model: nn.Module, tower: str) -> list[str]:
    """The modules that are ``tower``'s roots (place()'s root of its parameters)."""
    modules = dict(model.named_modules())
    named = model.named_parameters(remove_duplicate=False)  # a tied head is named too
    roots = {place(n)[1] for n, _ in named if place(n)[0] == tower}
    return sorted(r for r in roots if r in modules)


def _saved(model: nn.Module, cfg: LoraConfig, modules: dict, targets: list[str],
           errors: list[str]) -> list[str]:
    """lora.modules_to_save resolved to module names (outermost first)."""
    out: list[str] = []
    for i, entry in enumerate(cfg.modules_to_save):
        key = f"lora.modules_to_save[{i}]"
        if entry in SAVE_TOWERS:
            found = _roots(model, entry)
        else:
            found = [n for n in modules if n and _matches(n, entry)]
            found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
        if not found:
            errors.append(f"{key}: '{entry}' matches no module; give a tower ({', '.join(SAVE_TOWERS)}) "
                          "or a glob over full module names")
            continue
        for n in found:
            if not any(True for _ in modules[n].parameters()):
                errors.append(f"{key}: '{entry}' matches {n}, which holds no parameter")
            elif any(t == n or t.startswith(n + ".") or n.startswith(t + ".") for t in targets):
                errors.append(f"{key}: {n} holds LoRA targets (or is one); a module is either adapted "
                              "or trained fully: drop it here or narrow lora.targets")
            elif n not in out and not any(n.startswith(o + ".") for o in out):
                out.append(n)
    tied = _tied(model, out)
    for n, other in tied:
        errors.append(f"lora.modules_to_save: {n} shares its weight with {other} (tied); a trained copy "
                      "would untie them: leave it out")
    return out


def _tied(model: nn.Module, saved: list[str]) -> list[tuple[str, str]]:
    """(saved module, a module outside it sharing a parameter) pairs."""
    where: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        where.setdefault(id(p), []).append(n)
    out = []
    for s in saved:
        for names in where.values():
            inside = [n for n in names if n.startswith(s + ".")]
            outside = [n for n in names if not n.startswith(s + ".")]
            if inside and outside:
                out.append((s, outside[0].rsplit(".", 1)[0]))
                break
    return out


def resolve(model: nn.Module, cfg: LoraConfig) -> Targets:
    """The module names the recipe's lora section selects on ``model`` (meta or real, not yet
    wrapped); RecipeError with one line per problem."""
    modules = dict(model.named_modules())
    towers = _tower_of(model)
    order = {n: i for i, n in enumerate(modules)}
    errors: list[str] = []
    chosen: dict[str, list[str]] = {}
    for tower in TOWERS:
        names: list[str] = []
        for i, glob in enumerate(getattr(cfg.targets, tower)):
            for n in _glob_targets(glob, tower, f"lora.targets.{tower}[{i}]", modules, towers, errors):
                if n not in names:
                    names.append(n)
        chosen[tower] = sorted(names, key=order.__getitem__)
    targets = [n for t in TOWERS for n in chosen[t]]
    saved = _saved(model, cfg, modules, targets, errors)
    if errors:
        raise RecipeError(errors, "lora")
    keep = [n for tower in ("vision", "projector", "head") for n in _roots(model, tower)]
    return Targets(chosen, saved, sorted(set(keep + saved)))


def peft_config(cfg: LoraConfig, targets: Targets):
    """peft's LoraConfig for the resolved names (exact names: peft matches them whole)."""
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           use_rslora=cfg.rslora, init_lora_weights=INIT[cfg.init], bias="none",
                           target_modules=targets.all(), modules_to_save=targets.saved or None)


def apply(model: nn.Module, cfg: LoraConfig, targets: Targets | None = None) -> nn.Module:
    """Put the adapters into ``model`` in place (peft) and return it. On the meta device the
    adapters are created there too (no memory, no init: ``lr-table``). ``targets`` from
    :func:`resolve` (resolved here when not given)."""
    from peft import inject_adapter_in_model

    if not cfg.enabled:
        return model
    targets = targets or resolve(model, cfg)
    meta = next(model.parameters()).is_meta
    inject_adapter_in_model(peft_config(cfg, targets), model, low_cpu_mem_usage=meta)
    model.peft_config["default"].base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return model


def resolve_before_load(model_cfg, cfg: LoraConfig) -> Targets | None:
    """:func:`resolve` on the meta-device model (no weights read): a bad glob costs seconds."""
    if not cfg.enabled:
        return None
    from .model import meta_model

    return resolve(meta_model(model_cfg), cfg)


def quantization(cfg: LoraConfig, precision: str, targets: Targets | None):
    """QLoRA: transformers' BitsAndBytesConfig for ``lora.quantize: nf4`` (None otherwise): NF4
    with double quantization, computing and storing in the training precision (so DeepSpeed's
    cast leaves the packed weights alone); the vision tower, projector, head and the modules to
    save stay unquantized. RecipeError (one line) without CUDA or without bitsandbytes."""
    if not cfg.enabled or cfg.quantize == "none":
        return None
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise RecipeError(["lora.quantize: nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels) and none "
                           "is visible; set lora.quantize=none to train LoRA on unquantized weights"])
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(["lora.quantize: nf4 needs bitsandbytes: pip install bitsandbytes"])
    from transformers import BitsAndBytesConfig

    from .model import DTYPES

    dtype = DTYPES[precision]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                              llm_int8_skip_modules=list(targets.unquantized) if targets else None)
