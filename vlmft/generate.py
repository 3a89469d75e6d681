"""Answer a conversation with an HF vision-language model: greedy decoding with the KV cache,
stopping at the chat template's end of turn.

    text = answer(model, processor, messages, images=["cat.png"], max_new_tokens=64)

``messages`` are chat messages whose content is a list of parts, ``{"type": "image"}`` or
``{"type": "text", "text": ...}`` (vlmft/data/chat.py ``messages`` makes them from a record),
ending with the user turn to answer; ``images`` are the files of the image parts, in order.
The prompt is the chat template's rendering with the generation prompt, encoded through the
model family's processor exactly as training encodes a sample (vlmft/data/tokens.py), so
image tokens, tiles and the family's extra inputs (Qwen's grids and token types, Gemma's
token types) are those training used. Training switches the model's cache off (packed rows
need it off); generation asks for it explicitly.
"""

from __future__ import annotations

import torch

from .data import tokens
from .data.chat import Segment, template_text
from .export import end_of_turn_ids
from .models import family_of


def answer(model, processor, messages: list[dict], images=(), max_new_tokens: int = 64,
           max_tiles: int = 0) -> str:
    """The model's greedy answer (special tokens removed, stripped) to the last user turn."""
    from transformers import GenerationConfig

    fam = family_of(processor)
    enc = tokens.encode(processor, [Segment(template_text(processor, messages, gen=True), False, list(images))], max_tiles)
    param = next(model.parameters())
    kw = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
          for k, v in enc.vision.items()}
    if fam.token_key and enc.token_row is not None:
        kw[fam.token_key] = torch.tensor([enc.token_row], device=param.device)
    ids = torch.tensor([enc.input_ids], device=param.device)
    tok = processor.tokenizer
    eos = end_of_turn_ids(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=eos, pad_token_id=pad)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 synced_gpus=False, **kw)
    finally:
        model.train(was_training)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def ask(model_dir: str, question: str, images: list[str] = (), max_new_tokens: int = 64) -> str:
    """Load a model folder (an exported ``final/`` or any supported checkpoint) with its processor
    and answer one question about ``images`` (put before the question, as training's data does
    when a record has no placeholder)."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging

    from .model import load_processor
    from .recipe import ModelConfig

    logging.disable_progress_bar()  # the answer is the whole output
    cfg = ModelConfig(name_or_path=model_dir)
    processor = load_processor(cfg)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    if torch.cuda.is_available():
        model.cuda()
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return answer(model, processor, [{"role": "user", "content": content}], images, max_new_tokens)
