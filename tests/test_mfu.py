"""The MFU numerator (vlmft/mfu.py) against a hand count on the tiny InternVL of
tests/tiny_models.py (a 2-block ViT of width 48 on 28 px tiles of 7 px patches, a 2-layer MLP
projector, a 2-layer Qwen2 of width 64), with the whole model trained, the vision tower frozen,
and the language tower and head frozen."""

from __future__ import annotations

import pytest
import torch

from vlmft.mfu import model_flops
from vlmft.model import load_model
from vlmft.recipe import ModelConfig

from . import tiny_models

# parameter elements by hand from the architecture (embedding tables are not matmuls)
HV, IV, D, I, KV = 48, 96, 64, 128, 32
VISION = (HV + 17 * HV + (3 * 7 * 7 * HV + HV)          # class token, position table, patch conv
          + 2 * (2 * HV + 3 * HV * HV + (HV * HV + HV)   # per block: layer scales, q k v, output
                 + (HV * IV + IV) + (IV * HV + HV) + 4 * HV))  # MLP, two layer norms
PROJECTOR = 2 * 4 * HV + (4 * HV * D + D) + (D * D + D)  # layer norm, two linears (pixel shuffle: 4 x 48 in)
LANGUAGE = 2 * ((D * D + D) + 2 * (D * KV + KV) + D * D + 3 * D * I + 2 * D) + D
# one packed row: sample A = 30 tokens with one image (4 image tokens, one 28 px tile = 16 patches),
# 8 supervised; sample B = 10 text tokens, 5 supervised
PATCHES, IMAGE_TOKENS, TOKENS, SUPERVISED = 16, 4, 40, 13
LM_PAIRS = 30 * 31 // 2 + 10 * 11 // 2                  # causal query-key pairs per sample
LM_ATTN = 4 * (4 * 16) * 2 * LM_PAIRS                   # forward: 4 x heads*head_dim x layers x pairs
VIS_ATTN = 4 * HV * 2 * PATCHES ** 2                    # bidirectional over the tile's patches


def _batch(image_id: int) -> dict:
    ids = torch.full((1, TOKENS), 7)
    ids[0, 3:3 + IMAGE_TOKENS] = image_id
    labels = torch.full((1, TOKENS), -100)
    labels[0, 20:28] = 9
    labels[0, 33:38] = 9
    sample_ids = torch.tensor([[0] * 30 + [1] * 10])
    return {"input_ids": ids, "labels": labels, "sample_ids": sample_ids,
            "vision": {"pixel_values": torch.zeros(1, 3, 28, 28)}}


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(name_or_path=str(tiny_models.folder("internvl"))))


def _head(model) -> int:
    return model.config.text_config.vocab_size * D   # V x D, V from the config


def _freeze(model, *prefixes):
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(prefixes))


def test_hand_count_matches_the_model(model):
    by_tower = {"vision": 0, "projector": 0, "language": 0}
    for n, p in model.named_parameters():
        for t, prefix in (("vision", "model.vision_tower."), ("projector", "model.multi_modal_projector."),
                          ("language", "model.language_model.")):
            if n.startswith(prefix) and "embed_tokens" not in n:
                by_tower[t] += p.numel()
    assert by_tower == {"vision": VISION, "projector": PROJECTOR, "language": LANGUAGE}


def test_everything_trained(model):
    _freeze(model)
    want = (6 * VISION * PATCHES + 6 * PROJECTOR * IMAGE_TOKENS + 6 * LANGUAGE * TOKENS + 6 * _head(model) * SUPERVISED
            + 3 * LM_ATTN + 3 * VIS_ATTN)
    assert model_flops(model, [_batch(model.config.image_token_id)]) == want


def test_frozen_vision_runs_forward_only(model):
    _freeze(model, "model.vision_tower.")
    want = (2 * VISION * PATCHES + 6 * PROJECTOR * IMAGE_TOKENS + 6 * LANGUAGE * TOKENS + 6 * _head(model) * SUPERVISED
            + 3 * LM_ATTN + 1 * VIS_ATTN)
    assert model_flops(model, [_batch(model.config.image_token_id)]) == want


def test_frozen_language_after_trained_vision_still_backpropagates(model):
    _freeze(model, "model.language_model.", "lm_head.")
    want = (6 * VISION * PATCHES + 6 * PROJECTOR * IMAGE_TOKENS + 4 * LANGUAGE * TOKENS + 4 * _head(model) * SUPERVISED
            + 3 * LM_ATTN + 3 * VIS_ATTN)
    assert model_flops(model, [_batch(model.config.image_token_id)]) == want


def test_text_only_micro_batch_and_two_micro_batches(model):
    _freeze(model)
    text = _batch(model.config.image_token_id)
    text["vision"] = None
    text["input_ids"][0, 3:3 + IMAGE_TOKENS] = 7
    want_text = 6 * LANGUAGE * TOKENS + 6 * _head(model) * SUPERVISED + 3 * LM_ATTN
    assert model_flops(model, [text]) == want_text
    both = model_flops(model, [text, _batch(model.config.image_token_id)])
    assert both == want_text + model_flops(model, [_batch(model.config.image_token_id)])
