"""vlmft/generate.py against a reference it shares no code with: the stock processor's inputs
for the prompt and a greedy loop that reruns the model's whole forward (no cache) for every
new token, stopping at the chat template's end of turn. Every family's tiny model, and the
exact-match normalization."""

from __future__ import annotations

import pytest
import torch

from vlmft.data import chat
from vlmft.eval_answers import normalize
from vlmft.generate import answer
from vlmft.model import load_model, load_processor
from vlmft.recipe import ModelConfig

from . import tiny_models
from .test_families import RECORDS, write_data

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("generate-data"))


def greedy_without_cache(model, processor, msgs, paths, stop: set[int]) -> list[int]:
    from PIL import Image

    text = chat.template_text(processor, msgs, True)     # the template's own generation prompt
    imgs = [Image.open(p).convert("RGB") for p in paths] or None
    inputs = dict(processor(text=[text], images=imgs, return_tensors="pt", add_special_tokens=False))
    n = inputs["input_ids"].shape[1]
    for _ in range(STEPS):
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        t = int(logits.argmax())
        for k, v in list(inputs.items()):   # per-token rows grow: mask 1, token types 0 (text)
            if torch.is_tensor(v) and v.shape == inputs["input_ids"].shape and k != "input_ids":
                inputs[k] = torch.cat([v, torch.full((1, 1), int(k == "attention_mask"))], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[t]])], dim=1)
        if t in stop:
            break
    return inputs["input_ids"][0, n:].tolist()


@pytest.mark.parametrize("family", [f for f in tiny_models.FAMILIES if f != "paligemma"])
def test_answer_equals_a_greedy_loop_without_cache(family, data):
    from vlmft.export import end_of_turn_ids

    cfg = ModelConfig(name_or_path=str(tiny_models.folder(family)))
    processor = load_processor(cfg)
    model = load_model(cfg).train()    # as training has it: use_cache off, training mode
    root = data.rsplit("/", 1)[0]
    for record in RECORDS[:3]:         # text only, one image, two images
        msgs, paths = chat.messages(record, root)
        prompt = msgs[:-1]
        ids = greedy_without_cache(model, processor, prompt, paths, set(end_of_turn_ids(processor)))
        want = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert answer(model, processor, prompt, paths, max_new_tokens=STEPS) == want, family
    assert model.training              # left as it was found


def test_answer_on_the_demo_model_stops_at_the_end_of_turn(processor, in_root):
    """A model trained to answer 'Yes.' (the demo's end of turn is <|im_end|>): generation ends
    there, far before max_new_tokens, and the special token is not in the text."""
    model = load_model(ModelConfig(name_or_path="demo/model"))
    head = model.get_output_embeddings()
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    yes = processor.tokenizer("Yes.", add_special_tokens=False)["input_ids"]
    seq = yes + [end]
    calls = []

    def forced(module, args, out):     # the head answers the next token of 'Yes.<|im_end|>'
        k = len(calls)
        calls.append(k)
        logits = torch.full_like(out, -1e4)
        logits[..., seq[min(k, len(seq) - 1)]] = 1e4
        return logits

    seen = []                          # tokens the language model takes per call
    h = head.register_forward_hook(forced)
    g = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "Is it round?"}]}]
        assert answer(model, processor, msgs, [], max_new_tokens=30) == "Yes."
    finally:
        h.remove()
        g.remove()
    assert len(calls) == len(seq)      # one call per new token, then stop
    assert seen[0] > 5 and seen[1:] == [1] * (len(seq) - 1)   # the cache is on


@pytest.mark.parametrize("a, b, same", [
    ("The circle is red.", "the circle is red", True), ("  Red!\n", "red", True),
    ("Image 1.", "image  1", True), ("red", "Red circle", False), ("two", "three", False)])
def test_exact_match_normalization(a, b, same):
    assert (normalize(a) == normalize(b)) is same


def test_an_exported_folder_stops_stock_generate_at_the_end_of_turn_not_only_at_eos(tmp_path, in_root):
    """A base-model tokenizer whose EOS is <|endoftext|> while the chat template ends a turn with
    <|im_end|> (Qwen2-VL base models are so): the exported generation config stops stock
    ``generate`` at <|im_end|> too, and the KV cache is back on."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmft.export import save_for_inference

    processor = load_processor(ModelConfig(name_or_path="demo/model"))
    tok = processor.tokenizer
    tok.eos_token = "<|endoftext|>"
    model = load_model(ModelConfig(name_or_path="demo/model"))
    model.generation_config.eos_token_id = tok.eos_token_id
    save_for_inference(model, processor, str(tmp_path))
    end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    saved = AutoModelForImageTextToText.from_pretrained(str(tmp_path)).eval()
    ids = saved.generation_config.eos_token_id
    assert set(ids if isinstance(ids, list) else [ids]) == {end, eos} and saved.config.text_config.use_cache
    seq = tok("Yes.", add_special_tokens=False)["input_ids"] + [end]
    calls = []

    def forced(module, args, out):     # 'Yes.<|im_end|>', then <|im_end|> for ever
        logits = torch.full_like(out, -1e4)
        logits[..., seq[min(len(calls), len(seq) - 1)]] = 1e4
        calls.append(1)
        return logits

    saved.get_output_embeddings().register_forward_hook(forced)
    stock = AutoProcessor.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Is it round?"}]}]
    inputs = stock(text=stock.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    out = saved.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == seq
