"""Attention kernels for packed rows: which one a run gets, what a varlen kernel is handed per
micro-batch, and what the dense mask of ``sdpa`` costs.

A packed row holds several samples end to end with position ids restarting at each sample.
How each kernel (``model.attn_implementation``) keeps the samples apart, in transformers 5.x:

- ``flash_attention_2`` / ``flash_attention_3``: the varlen kernels take the row's sample
  boundaries (``cu_seqlens``) and attend within each sample; no mask is built. vlmft passes
  them once per micro-batch (:func:`varlen_kwargs`, from the row's sample ids on the host);
  left to itself transformers re-derives them from the position ids in every layer, with host
  syncs. Needs the flash-attn package (2) or its Hopper build (3, ``flash_attn_interface``);
  neither has a binary wheel on PyPI.
- ``flex_attention``: transformers builds a block-sparse document mask (a ``BlockMask``, no
  L x L tensor) from the restarting positions; torch compiles the kernel on first use (about
  25 s on a 2-core CPU). Not every model class supports it (Qwen-VL does not).
- ``sdpa``: transformers detects the packed row and materializes a dense boolean (B, 1, L, L)
  mask; torch's SDPA then cannot use its flash kernel and runs a masked kernel with an L x L
  bias per layer, kept for backward (:func:`dense_mask_bytes`). Exact, and the default on CPU.
- ``eager``: (B, heads, L, L) attention weights per layer; the recipe refuses it with packing.

``auto`` (the default) resolves, on a CUDA device, to the first of ``flash_attention_3``
(compute capability 9.x), ``flash_attention_2``, ``flex_attention`` that is importable and that
the model class supports, else ``sdpa``; without CUDA to ``sdpa``.
"""

from __future__ import annotations

import importlib.util

import torch

KERNELS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
VARLEN = {"flash_attention_2", "flash_attention_3"}   # kernels handed the row's cu_seqlens
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
DENSE_MASK_BUDGET = 2 * 2**30   # bytes of sdpa's dense packed-row mask above which vlmft warns
_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


class KernelError(ValueError):
    """A kernel the recipe names that cannot run here; the message is one line."""


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of the current CUDA device, or None without one."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def supported(model_class: type | None) -> set[str]:
    """Kernels the model class declares support for (transformers' own flags)."""
    if model_class is None:   # unknown (remote code): let transformers decide
        return set(KERNELS) - {"auto"}
    out = {"eager"}
    if getattr(model_class, "_supports_sdpa", False):
        out.add("sdpa")
    if getattr(model_class, "_supports_flex_attn", False):
        out.add("flex_attention")
    if getattr(model_class, "_supports_flash_attn", False):
        out |= VARLEN
    return out


def importable(kernel: str) -> bool:
    """The kernel's package can be imported (no import is made)."""
    pkg = _PACKAGES.get(kernel)
    if pkg is not None:
        return importlib.util.find_spec(pkg) is not None
    if kernel == "flex_attention":
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return True


def resolve(requested: str, model_class: type | None, capability: tuple[int, int] | None) -> str:
    """The kernel to load the model with; KernelError (one line) for one that cannot run.
    ``capability``: the CUDA device's compute capability, None without CUDA."""
    ok = supported(model_class)
    name = getattr(model_class, "__name__", "this model")
    if requested == "auto":
        if capability is None:
            return "sdpa" if "sdpa" in ok else "eager"
        for k in ("flash_attention_3", "flash_attention_2", "flex_attention"):
            if k in ok and importable(k) and (k != "flash_attention_3" or capability[0] == 9):
                return k
        return "sdpa" if "sdpa" in ok else "eager"
    key = f"model.attn_implementation: {requested}"
    if requested not in ok:
        raise KernelError(f"{key} is not supported by {name}; it supports "
                          f"{', '.join(k for k in KERNELS if k in ok)} (or auto)")
    if requested in VARLEN:
        if capability is None:
            raise KernelError(f"{key} needs a CUDA GPU; use auto (sdpa here) or flex_attention")
        if not importable(requested):
            raise KernelError(f"{key} needs the {_PACKAGES[requested]} package, which is not installed "
                              "(no binary wheel on PyPI: build flash-attn for this torch and CUDA); "
                              "or use auto, which picks flex_attention or sdpa")
    return requested


def takes_varlen(model) -> bool:
    """Whether the model's language tower runs a kernel that is handed cu_seqlens."""
    impl = getattr(model.config.get_text_config(), "_attn_implementation", None)
    return impl in VARLEN


def varlen_kwargs(sample_ids: torch.Tensor) -> dict:
    """The varlen kernels' arguments for a packed row [1, L] of sample ids (host side):
    ``cu_seq_lens_q/k`` int32 [k + 1] (0, l0, l0 + l1, ...), ``max_length_q/k`` Python ints (no
    device read in any layer)."""
    if sample_ids.dim() != 2 or sample_ids.shape[0] != 1:
        raise ValueError(f"varlen_kwargs: one packed row [1, L] expected, got {tuple(sample_ids.shape)}")
    _, counts = torch.unique_consecutive(sample_ids[0].cpu(), return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    cu[1:] = counts.cumsum(0)
    longest = int(counts.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def dense_mask_bytes(row_tokens: int, layers_held: int, element_bytes: int) -> int:
    """sdpa on a packed row of ``row_tokens``: the boolean (1, 1, L, L) mask, plus the L x L bias
    of the training dtype that torch's masked kernel keeps for backward in each of
    ``layers_held`` layers (all language layers, or 1 when they are recomputed)."""
    square = int(row_tokens) ** 2
    return square + layers_held * square * element_bytes


def dense_mask_note(kernel: str, row_tokens: int, layers: int, element_bytes: int,
                    recomputed: bool, budget: int = DENSE_MASK_BUDGET) -> str | None:
    """A warning when sdpa's dense packed-row mask would cost more than ``budget`` bytes."""
    if kernel != "sdpa":
        return None
    held = 1 if recomputed else layers
    need = dense_mask_bytes(row_tokens, held, element_bytes)
    if need <= budget:
        return None
    return (f"vlmft: warning: model.attn_implementation resolves to sdpa and packed rows hold up to "
            f"{row_tokens:,} tokens: transformers builds a dense {row_tokens:,} x {row_tokens:,} mask and "
            f"SDPA runs its masked kernel, about {need / 2**30:.1f} GiB of mask and attention bias "
            f"({held} layer(s) x L^2 x {element_bytes} bytes + L^2) above the {budget / 2**30:.0f} GiB "
            "budget; flash_attention_2/3 or flex_attention keep samples apart without it "
            "(model.attn_implementation=auto picks one on a GPU)")
