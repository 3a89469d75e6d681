"""Tiny random VLMs of every supported family, built from configs in code and saved as ordinary
HF folders (config, weights, tokenizer, processor, chat template), the way a real checkpoint
looks. No download: the tokenizer is a byte-level BPE trained here with the family's special
tokens, the image processor is the family's own (pillow variant), the chat template follows the
family's (ChatML for InternVL/Qwen/OneVision, Llama-style for LLaVA, Idefics3's User:/Assistant:,
Gemma's turns; none for PaliGemma, like its real checkpoints).

    path = tiny_models.folder("qwen2_5_vl")   # built once per test session, cached

Sizes: 28-56 pixel images, 2-layer towers, hidden size 64; every model has well under 1 M
parameters and runs a packed row in milliseconds on a CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import transformers as tf

CACHE = Path(os.environ.get("VLMFT_TINY_MODELS", Path(tempfile.gettempdir()) / "vlmft-tiny-models"))
FAMILIES = ("internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision",
            "idefics3", "smolvlm", "gemma3", "paligemma")
CORPUS = ["system user assistant model What color is the shape? The circle is red. A blue square.",
          "Which image shows green? Image 1. Both. What is two plus three? two plus three is five.",
          "Is it round? Yes. No. purple orange yellow triangle Describe the picture briefly."] * 8

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
          "{% for c in message['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}"
          "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(special: list[str], eos: str, pad: str, bos: str | None = None, extra: dict | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kw = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad, extra_special_tokens=extra or {})
    if bos:
        kw["bos_token"] = bos
    return tf.PreTrainedTokenizerFast(**kw)


def _text(tokenizer, model_type="qwen2", **kw) -> dict:
    return dict(model_type=model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)


def _ids(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


# ------------------------------------------------------------------------------ families

def _qwen(kind: str):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(special, "<|im_end|>", "<|endoftext|>", extra={
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ip = tf.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84, patch_size=14, merge_size=2,
                                     temporal_patch_size=2)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    if kind == "qwen2_vl":
        cfg_cls, vis = tf.Qwen2VLConfig, dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2)
    elif kind == "qwen2_5_vl":
        cfg_cls, vis = tf.Qwen2_5_VLConfig, dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                 num_heads=2, fullatt_block_indexes=[1], window_size=56)
    else:
        cfg_cls, vis = tf.Qwen3VLConfig, dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                              num_heads=2, deepstack_visual_indexes=[0],
                                              num_position_embeddings=16)
        rope = {**rope, "mrope_interleaved": True}
    vis.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    text = _text(tok, model_type=f"{kind}_text", rope_parameters=rope)
    text.pop("max_position_embeddings")
    cfg = cfg_cls(text_config=text, vision_config=vis,
                  **dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
                             _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))))
    cfg.tie_word_embeddings = False
    proc_cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
                "qwen3_vl": tf.Qwen3VLProcessor}[kind]
    template = CHATML.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    return cfg, proc_cls, dict(image_processor=ip, tokenizer=tok, chat_template=template)


def _internvl():
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = _tokenizer(special, "<|im_end|>", "<|endoftext|>", extra={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    cfg = tf.InternVLConfig(
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                           image_size=[28, 28], patch_size=[7, 7]),
        text_config=_text(tok), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=False)
    return cfg, tf.InternVLProcessor, dict(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                           chat_template=CHATML.replace("IMAGE", "<IMG_CONTEXT>\n"))


LLAMA_STYLE = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}\n"
               "{% elif message['role'] == 'user' %}USER: {% for c in message['content'] %}"
               "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
               "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _clip(image_size=28):
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=image_size, patch_size=7, projection_dim=32)


def _llava(kind: str):
    tok = _tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], "</s>", "<pad>", bos="<s>",
                     extra={"image_token": "<image>"})
    image_id = tok.convert_tokens_to_ids("<image>")
    if kind == "llava":
        ip = tf.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        cfg = tf.LlavaConfig(vision_config=_clip(), text_config=_text(tok, model_type="llama"),
                             image_token_index=image_id, vision_feature_layer=-1, tie_word_embeddings=False)
        return cfg, tf.LlavaProcessor, dict(image_processor=ip, tokenizer=tok, patch_size=7,
                                            vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1, chat_template=LLAMA_STYLE)
    pins = [[28, 56], [56, 28], [56, 56]]
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                       image_grid_pinpoints=pins)
    cfg = tf.LlavaNextConfig(vision_config=_clip(), text_config=_text(tok, model_type="llama"),
                             image_token_index=image_id, vision_feature_layer=-1, image_grid_pinpoints=pins,
                             tie_word_embeddings=False)
    return cfg, tf.LlavaNextProcessor, dict(image_processor=ip, tokenizer=tok, patch_size=7,
                                            vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1, chat_template=LLAMA_STYLE)


def _onevision():
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = _tokenizer(special, "<|im_end|>", "<|endoftext|>", extra={"image_token": "<image>", "video_token": "<video>"})
    pins = [[28, 56], [56, 28], [56, 56]]
    ip = tf.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=pins)
    vis = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=28, patch_size=7, vision_use_head=False)
    cfg = tf.LlavaOnevisionConfig(vision_config=vis, text_config=_text(tok),
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, image_grid_pinpoints=pins, tie_word_embeddings=False)
    return cfg, tf.LlavaOnevisionProcessor, dict(
        image_processor=ip, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=CHATML.replace("IMAGE", "<image>\n"))


IDEFICS3 = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
            "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
            "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


def _idefics3(kind: str):
    rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>", "<video>", *rows]
    tok = _tokenizer(special, "<end_of_utterance>", "<|endoftext|>", extra={
        "fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"})
    ip_cls = tf.Idefics3ImageProcessorPil if kind == "idefics3" else tf.SmolVLMImageProcessorPil
    ip = ip_cls(size={"longest_edge": 56}, max_image_size={"longest_edge": 28}, do_image_splitting=True)
    cfg_cls = tf.Idefics3Config if kind == "idefics3" else tf.SmolVLMConfig
    cfg = cfg_cls(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=28, patch_size=7),
                  text_config=_text(tok, model_type="llama"), scale_factor=2,
                  image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    proc_cls = tf.Idefics3Processor if kind == "idefics3" else tf.SmolVLMProcessor
    return cfg, proc_cls, dict(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3)


GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else 'user' %}<start_of_turn>{{ role }}\n{% for c in message['content'] %}"
         "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

def _gemma(kind: str):
    vis = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=28, patch_size=7, vision_use_head=False)
    if kind == "gemma3":
        special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
        tok = _tokenizer(special, "<end_of_turn>", "<pad>", bos="<bos>", extra={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
        text = _text(tok, model_type="gemma3_text", head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vis, mm_tokens_per_image=4,
                              **dict(zip(("boi_token_index", "eoi_token_index", "image_token_index"),
                                         _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>"))))
        ip = tf.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
        return cfg, tf.Gemma3Processor, dict(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                             chat_template=GEMMA)
    tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], "<eos>", "<pad>", bos="<bos>",
                     extra={"image_token": "<image>"})
    text = _text(tok, model_type="gemma", head_dim=16)
    cfg = tf.PaliGemmaConfig(text_config=text, vision_config={**vis, "projection_dim": 64}, projection_dim=64,
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    ip = tf.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    ip.image_seq_length = 16
    return cfg, tf.PaliGemmaProcessor, dict(image_processor=ip, tokenizer=tok)  # no template, like the real ones


def parts(family: str):
    """(config, stock processor class, processor arguments) of a family's tiny model."""
    if family.startswith("qwen"):
        return _qwen(family)
    if family == "internvl":
        return _internvl()
    if family in ("llava", "llava_next"):
        return _llava(family)
    if family == "llava_onevision":
        return _onevision()
    if family in ("idefics3", "smolvlm"):
        return _idefics3(family)
    return _gemma(family)


def build(family: str, out: Path, seed: int = 0) -> Path:
    """Save the family's tiny model as an HF folder. Processors that declare a video processor
    are saved without one (torchvision is not installed here) but name the stock class, as a
    real checkpoint does."""
    from vlmft.models.base import image_only

    cfg, proc_cls, kwargs = parts(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_only(proc_cls)(**kwargs).save_pretrained(out)
    return out


def folder(family: str) -> Path:
    """The cached folder of a family's tiny model (built on first use in this process tree)."""
    path = CACHE / family
    if not (path / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
        build(family, tmp / family)
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp / family, path)
        except OSError:  # another process won the race: keep its folder
            pass
    return path


def processor_class_name(path: Path) -> str:
    return json.loads((Path(path) / "processor_config.json").read_text())["processor_class"]
