"""What makes an exported folder ready for inference with stock transformers.

Training switches the KV cache off (packed rows need it off); an exported model gets it back
(``use_cache: true``), and its generation config stops at the chat template's end of turn (the
token that closes an assistant turn, e.g. ``<|im_end|>``) as well as the tokenizer's EOS, with a
pad token set, so ``generate`` ends an answer where training taught it to. The processor is saved
under its stock class name; where that class declares a video processor (InternVL, Qwen-VL,
LLaVA-OneVision, SmolVLM), the folder also names one, so that ``AutoProcessor`` can build the
stock processor on machines that have torchvision (vlmft itself loads it image-only).
"""

from __future__ import annotations

import json
from pathlib import Path


def end_of_turn_ids(processor) -> list[int]:
    """Token ids that end an assistant turn: the last token the chat template writes after an
    answer, and the tokenizer's EOS."""
    from .data import chat

    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]
    tok = processor.tokenizer
    ids = []
    try:
        answer = [s.text for s in chat.segments(processor, msgs, []) if s.supervised]
        if answer:
            ids.append(tok(answer[-1], add_special_tokens=False)["input_ids"][-1])
    except chat.BadSample:
        pass
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def save_for_inference(model, processor, path: str, state: dict | None = None) -> None:
    """``model.save_pretrained`` + ``processor.save_pretrained`` with inference settings; the
    model object itself is left as training had it."""
    configs = [model.config] + [c for c in [getattr(model.config, "text_config", None)] if c is not None]
    saved = [c.use_cache for c in configs]
    gen = model.generation_config
    old = (gen.eos_token_id, gen.pad_token_id)
    eos = end_of_turn_ids(processor)
    pad = processor.tokenizer.pad_token_id
    try:
        for c in configs:
            c.use_cache = True
        gen.eos_token_id = eos if len(eos) > 1 else (eos[0] if eos else gen.eos_token_id)
        gen.pad_token_id = pad if pad is not None else (eos[0] if eos else gen.pad_token_id)
        model.save_pretrained(path, state_dict=state)
    finally:
        for c, v in zip(configs, saved):
            c.use_cache = v
        gen.eos_token_id, gen.pad_token_id = old
    processor.save_pretrained(path)
    _name_video_processor(processor, Path(path), model.config.model_type)


def _name_video_processor(processor, path: Path, model_type: str) -> None:
    """Name the family's stock video processor class (with its defaults) in a saved
    processor_config.json whose stock processor class needs one."""
    from .models import family_of

    video = family_of(processor).video_processors.get(model_type)
    cfg = path / "processor_config.json"
    if not video or not cfg.is_file():
        return
    data = json.loads(cfg.read_text())
    if "video_processor" not in data:
        data["video_processor"] = {"video_processor_type": video}
        cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
