"""What makes an exported folder ready for inference with stock transformers.

Training switches the KV cache off (packed rows need it off); an exported model gets it back
(``use_cache: true``), and its generation config stops at the chat template's end of turn (the
token that closes an assistant turn, e.g. ``<|im_end|>``) as well as the tokenizer's EOS, with a
pad token set, so ``generate`` ends an answer where training taught it to. The processor is saved
under its stock class name; where that class declares a video processor (InternVL, Qwen-VL,
LLaVA-OneVision, SmolVLM), the folder also names one, so that ``AutoProcessor`` can build the
stock processor on machines that have torchvision (vlmft itself loads it image-only).

A LoRA run (vlmft/lora.py) exports two folders from one full state dict of the wrapped model
(peft's names, vlmft/peft_names.py; gathered first under ZeRO-3):

- the **merged** model (:func:`merged_state`): every adapted layer's weight becomes
  ``W + scaling x B A`` (computed in fp32, stored in W's dtype), each module to save its trained
  copy, under the stock names, so the folder loads with transformers like a full fine-tune's
  (QLoRA: W from the base model loaded again unquantized, :func:`unquantized_base`);
- the **adapter** (:func:`save_adapter`): peft's own format (``adapter_config.json`` +
  ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``) that
  ``PeftModel.from_pretrained(base_model, folder)`` loads onto the base model.

Both carry the processor and the chat template used in training.
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
    save_processor(processor, path, model.config.model_type)


def save_processor(processor, path: str, model_type: str) -> None:
    """The processor (tokenizer, chat template, image processor) as training used it."""
    processor.save_pretrained(path)
    _name_video_processor(processor, Path(path), model_type)


def _stock_name(name: str) -> str:
    """A wrapped model's parameter name without peft's components (``X.base_layer.weight`` ->
    ``X.weight``, ``M.modules_to_save.default.w`` -> ``M.w``)."""
    parts = name.split(".")
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
        elif parts[i] == "modules_to_save" and i + 1 < len(parts):
            i += 2  # and the adapter name after it
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def merged_state(model, state: dict, base: dict | None = None) -> dict:
    """The stock state dict of the LoRA-wrapped ``model`` with its adapters merged, from
    ``state`` (the wrapped model's full state dict; ``model`` gives each layer's scaling).
    ``base``: the unquantized base model's stock state dict, for the frozen weights of a QLoRA
    model (its own are 4-bit)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from .peft_names import kind

    out = {_stock_name(k): v for k, v in state.items()
           if kind(k) != "adapter" and ".original_module." not in f".{k}"}
    if base is not None:
        out = {**base, **{_stock_name(k): v for k, v in state.items() if kind(k) == "saved"}}
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter in mod.active_adapters:
            a = state[f"{name}.lora_A.{adapter}.weight"].to(torch.float32)
            b = state[f"{name}.lora_B.{adapter}.weight"].to(torch.float32)
            w = out[f"{name}.weight"]
            out[f"{name}.weight"] = (w.to(torch.float32) + (b @ a) * mod.scaling[adapter]).to(w.dtype)
    return out


def quantized(model) -> bool:
    """Whether ``model``'s weights were loaded quantized (QLoRA)."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False))


def unquantized_base(model):
    """QLoRA's base model loaded again unquantized on the CPU, in the compute dtype: the merged
    folder holds ``W + scaling x B A`` in that dtype, not a 4-bit W."""
    from transformers import AutoModelForImageTextToText

    dtype = model.config.quantization_config.bnb_4bit_compute_dtype
    return AutoModelForImageTextToText.from_pretrained(model.name_or_path, dtype=dtype)


def save_adapter(model, processor, path: str, state: dict) -> None:
    """peft's adapter folder for the wrapped ``model`` (``state``: its full state dict), with
    the processor; ``PeftModel.from_pretrained(base, path)`` loads it."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapter.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(model.peft_config["default"])
    cfg.inference_mode = True
    cfg.target_modules = sorted(cfg.target_modules)
    cfg.save_pretrained(str(out), auto_mapping_dict={"base_model_class": type(model).__name__,
                                                     "parent_library": type(model).__module__})
    save_processor(processor, str(out), model.config.model_type)


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
