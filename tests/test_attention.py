"""Attention kernels for packed rows (vlmft/attention.py): what ``auto`` and the named kernels
resolve to, that a packed row run with every kernel that runs on a CPU gives each sample the
logits it gets alone (through the default kernel, <= 1e-4), that a varlen kernel is handed the
row's cu_seqlens in the language tower only, and the dense-mask warning and eager refusal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmft import attention
from vlmft.model import attention_kernel, load_model
from vlmft.recipe import ModelConfig, RecipeError, load

from . import tiny_models
from .conftest import DEMO, ROOT
from .test_families import data, packed_vs_alone  # noqa: F401  (data: the module fixture)

FAMILIES = ("internvl", "qwen2_5_vl")
TOL = 1e-4


class _Flags:
    """A model class as transformers declares it."""
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_flash_attn = False


def _cls(flex=False, flash=False):
    return type("Fake", (_Flags,), {"_supports_flex_attn": flex, "_supports_flash_attn": flash})


def test_auto_is_sdpa_without_cuda():
    cfg = ModelConfig(name_or_path=str(ROOT / "demo" / "model"))
    assert cfg.attn_implementation == "auto"          # the default
    assert not torch.cuda.is_available()
    assert attention_kernel(cfg) == "sdpa"
    model = load_model(cfg)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_auto_on_cuda_takes_the_best_importable_supported_kernel(monkeypatch):
    have = {"flash_attention_2": False, "flash_attention_3": False, "flex_attention": True}
    monkeypatch.setattr(attention, "importable", lambda k: have.get(k, True))
    assert attention.resolve("auto", _cls(flex=True, flash=True), (9, 0)) == "flex_attention"
    assert attention.resolve("auto", _cls(flex=False, flash=True), (9, 0)) == "sdpa"   # Qwen-VL without flash-attn
    have["flash_attention_2"] = True
    assert attention.resolve("auto", _cls(flex=True, flash=True), (8, 0)) == "flash_attention_2"
    have["flash_attention_3"] = True
    assert attention.resolve("auto", _cls(flex=True, flash=True), (8, 0)) == "flash_attention_2"  # FA3: Hopper only
    assert attention.resolve("auto", _cls(flex=True, flash=True), (9, 0)) == "flash_attention_3"
    assert attention.resolve("auto", _cls(flex=True, flash=False), (9, 0)) == "flex_attention"  # Gemma 3
    assert attention.resolve("auto", _cls(flex=True, flash=True), None) == "sdpa"


def test_named_kernels_that_cannot_run_are_one_line(monkeypatch):
    with pytest.raises(attention.KernelError, match="needs a CUDA GPU"):
        attention.resolve("flash_attention_2", _cls(flash=True), None)
    monkeypatch.setattr(attention, "importable", lambda k: k != "flash_attention_2")
    with pytest.raises(attention.KernelError, match="needs the flash_attn package"):
        attention.resolve("flash_attention_2", _cls(flash=True), (9, 0))
    with pytest.raises(attention.KernelError, match="not supported by Fake; it supports sdpa, eager"):
        attention.resolve("flex_attention", _cls(), None)
    cfg = ModelConfig(name_or_path=str(tiny_models.folder("qwen2_5_vl")), attn_implementation="flex_attention")
    with pytest.raises(RecipeError) as err:
        load_model(cfg)
    assert err.value.errors == ["model.attn_implementation: flex_attention is not supported by "
                                "Qwen2_5_VLForConditionalGeneration; it supports sdpa, eager, "
                                "flash_attention_2, flash_attention_3 (or auto)"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_row_equals_each_sample_alone_per_kernel(family, kernel, data):  # noqa: F811
    assert packed_vs_alone(family, data, kernel=kernel) <= TOL


@pytest.mark.slow  # torch compiles flex attention on first use: ~25 s on 2 cores
def test_packed_row_equals_each_sample_alone_flex(data):  # noqa: F811
    assert packed_vs_alone("internvl", data, kernel="flex_attention") <= TOL


# A varlen kernel on the CPU: attends within the spans that cu_seq_lens_q names (as the flash
# kernels do), over the whole row without them. transformers builds no mask for a kernel it does
# not know, so only the cu_seqlens vlmft hands over keep the samples apart.
PROBE = "vlmft_test_varlen"


def _varlen_probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    causal = kw.get("is_causal", getattr(module, "is_causal", True))
    cu = kw.get("cu_seq_lens_q")
    bounds = cu.tolist() if cu is not None else [0, query.shape[2]]
    if cu is not None:   # as a real varlen kernel, whose tokens are (batch x length) flattened
        assert bounds[-1] == query.shape[0] * query.shape[2], (type(module).__name__, bounds, query.shape)
        assert isinstance(kw["max_length_q"], int) and kw["max_length_q"] == max(
            b - a for a, b in zip(bounds, bounds[1:]))
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=causal,
                                            scale=scaling, enable_gqa=True) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


@pytest.fixture
def varlen_probe(monkeypatch):
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE, _varlen_probe)
    monkeypatch.setattr(attention, "VARLEN", attention.VARLEN | {PROBE})
    return lambda model: model.set_attn_implementation(PROBE)


@pytest.mark.parametrize("family", FAMILIES + ("llava",))
def test_varlen_kernels_get_the_rows_cu_seqlens_in_the_language_tower(family, data, varlen_probe, monkeypatch):  # noqa: F811
    # LLaVA's CLIP passes its keyword arguments down: handed the row's cu_seqlens it would split
    # its own sequences by them (the probe checks they cover exactly the tokens it is given)
    assert packed_vs_alone(family, data, prepare=varlen_probe) <= TOL
    monkeypatch.setattr(attention, "VARLEN", attention.VARLEN - {PROBE})   # the control: not handed over
    assert packed_vs_alone(family, data, prepare=varlen_probe) > 1e-2


def test_varlen_kwargs_from_sample_ids():
    kw = attention.varlen_kwargs(torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2]]))
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 4, 8] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert (kw["max_length_q"], kw["max_length_k"]) == (4, 4)


def test_dense_mask_warning_states_its_estimate():
    # 16k-token rows, 28 bf16 layers held for backward: 28 x 16384^2 x 2 bytes + 16384^2 = 14.25 GiB
    note = attention.dense_mask_note("sdpa", 16384, 28, 2, recomputed=False)
    assert note and "14.2 GiB" in note and "16,384 x 16,384" in note
    assert attention.dense_mask_bytes(16384, 28, 2) == 28 * 16384**2 * 2 + 16384**2
    assert attention.dense_mask_note("sdpa", 16384, 28, 2, recomputed=True) is None   # 0.75 GiB
    assert attention.dense_mask_note("sdpa", 4096, 28, 2, recomputed=False) is None   # 0.9 GiB
    assert attention.dense_mask_note("flex_attention", 65536, 28, 2, recomputed=False) is None


def test_eager_with_packing_is_refused(in_root):
    with pytest.raises(RecipeError) as err:
        load(DEMO, ["model.attn_implementation=eager"])
    assert err.value.errors[0].startswith("model.attn_implementation: eager with packed rows")
    load(DEMO, ["model.attn_implementation=eager", "data.packing.enabled=false"])   # one sample a row: fine


def test_training_warns_for_the_models_own_estimate():
    from vlmft.model import attention_note

    model = load_model(ModelConfig(name_or_path=str(ROOT / "demo" / "model")))   # 2 fp32 layers, sdpa
    note = attention_note(model, "none", 16384)     # 16384^2 x (1 + 2 x 4) bytes = 2.25 GiB
    assert note and "2.2 GiB" in note and "2 layer(s) x L^2 x 4 bytes" in note
    assert attention_note(model, "language", 16384) is None     # recomputed: one layer held, 1.25 GiB
    assert attention_note(model, "none", None) is None          # not packed: no mask
