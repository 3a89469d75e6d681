"""Packed rows against padded batches, per attention kernel, on a random VLM of realistic shape.

    python benchmarks/bench_gpu.py                      # a CUDA GPU: the 1B-class shape, every kernel available
    python benchmarks/bench_gpu.py --kernels sdpa,flash_attention_2 --steps 10 --json out.json
    python benchmarks/bench_gpu.py --small              # CPU, shapes shrunk, nothing recorded (CI runs it)

The model is built from a config, random weights, bf16: an InternViT-300M-class vision tower
(width 1024, 24 blocks, 448 px tiles of 14 px patches) and a Qwen2-0.5B-class language tower
(width 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151,674) joined by InternVL's pixel
shuffle and projector (256 tokens a tile): 0.8 B parameters. The samples (seed 0): 300-2,048
tokens each with one image tile after 8 text tokens, the last 30% supervised, until a
16,384-token row is full.

For every kernel (sdpa, flex_attention, and flash_attention_2/3 where installed; eager too in
``--small``), two ways to train on the same samples, ``--steps`` measured steps after 2 warm-up
steps, each a forward, a backward and a torch AdamW step on the bf16 weights (no DeepSpeed: the
kernels and the layout are compared, not the ZeRO stage):

- **packed**: one row, vlmft's own path (vlmft/forward.py: the family's model inputs, restarting
  positions, the varlen kernels' cu_seqlens, the chunked head on supervised tokens);
- **padded**: one sample a row, padded to the longest, with an attention mask.

Recorded per case: step time (median), tokens/s and supervised tokens/s (real tokens, no
padding), peak GPU memory, MFU = vlmft/mfu.py's FLOPs of the samples (the same useful work in
both layouts) / step time / the device's dense bf16 peak (vlmft/metrics.py). And per kernel,
isolation in bf16: the packed row's logits against each sample run alone, as the mean
|difference| over the mean |logit| (``packed_vs_alone``), next to the control, the same row with
position ids that run on over the whole row (the samples see each other: ``control_leak``); the
check passes when packed_vs_alone <= ``ISOLATION_TOL`` < control_leak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmft import attention  # noqa: E402
from vlmft.data.stream import row  # noqa: E402
from vlmft.data.tokens import Encoded  # noqa: E402
from vlmft.forward import LossModule, hidden_states, model_inputs, to_device  # noqa: E402
from vlmft.loss import token_weights, weighted_ce_sum  # noqa: E402
from vlmft.metrics import peak_flops  # noqa: E402
from vlmft.mfu import model_flops  # noqa: E402
from vlmft.models import InternVL  # noqa: E402

ISOLATION_TOL = 0.02
SHAPES = {   # (vision, text, tokens per tile, image px, row tokens, sample lengths)
    "1b": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=[448, 448], patch_size=[14, 14]),
           dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151674, max_position_embeddings=32768),
           256, 448, 16384, (300, 2048)),
    "small": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=[28, 28], patch_size=[7, 7]),
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
              4, 28, 256, (12, 60)),
}


def build_model(shape: str, kernel: str, device: str):
    import transformers as tf

    vision, text, per_tile, _, _, _ = SHAPES[shape]
    cfg = tf.InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **text),
                            image_token_id=text["vocab_size"] - 1, image_seq_length=per_tile,
                            downsample_ratio=0.5, tie_word_embeddings=False)
    cfg.text_config.use_cache = False
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(cfg, attn_implementation=kernel, dtype=torch.bfloat16)
    return model.to(device)


def make_samples(shape: str) -> list[Encoded]:
    """Random samples (seed 0) until a row is full: 8 text tokens, one tile, text; last 30% supervised."""
    _, text, per_tile, px, row_tokens, (lo, hi) = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    image_id, out, used = text["vocab_size"] - 1, [], 0
    while True:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        if used + n > row_tokens:
            return out
        ids = torch.randint(0, image_id - 1, (n,), generator=g).tolist()
        ids[8:8 + per_tile] = [image_id] * per_tile
        start = max(8 + per_tile, int(0.7 * n))
        labels = [-100] * start + ids[start:]
        pix = torch.randn(1, 3, px, px, generator=g)
        out.append(Encoded(ids, labels, {"pixel_values": pix}, tiles=1))
        used += n


def packed_batch(samples: list[Encoded]) -> dict:
    b = row(samples, [1.0] * len(samples), InternVL())
    b.update(num_samples=len(samples), num_bad=0)
    return b


def padded_batch(samples: list[Encoded]) -> dict:
    """One sample a row, right-padded to the longest, labels shifted within each sample."""
    longest = max(len(s.input_ids) for s in samples)
    pad = lambda xs, v: xs + [v] * (longest - len(xs))  # noqa: E731
    return {"input_ids": torch.tensor([pad(s.input_ids, 0) for s in samples]),
            "attention_mask": torch.tensor([pad([1] * len(s.input_ids), 0) for s in samples]),
            "labels": torch.tensor([pad(s.labels[1:] + [-100], -100) for s in samples]),
            "pixel_values": torch.cat([s.vision["pixel_values"] for s in samples])}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_case(model, samples, mode: str, steps: int, device: str, chunk: int) -> dict:
    """Median step time and peak memory of ``steps`` steps after 2 warm-up steps."""
    fam = InternVL()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    module = LossModule(model, fam, chunk)
    packed = packed_batch(samples)
    padded = padded_batch(samples)
    times = []
    for i in range(steps + 2):
        if i == 2 and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        if mode == "packed":
            w = token_weights(packed["labels"], packed["sample_ids"], None, "token").to(device)
            inputs = to_device(model_inputs(fam, model, packed), device)
            loss = module(inputs, w) / w.sum()
        else:
            b = to_device(padded, device)
            hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 pixel_values=b["pixel_values"].to(torch.bfloat16), use_cache=False).last_hidden_state
            w = (b["labels"] != -100).float()
            loss = weighted_ce_sum(hidden, model.get_output_embeddings(), b["labels"], w, chunk) / w.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"step_s": statistics.median(times), "peak_memory_gb": peak, "loss": float(loss.detach())}


def logits_of(model, batch: dict, device: str) -> torch.Tensor:
    fam = InternVL()
    inputs = to_device(model_inputs(fam, model, batch), device)
    with torch.no_grad():
        return model.get_output_embeddings()(hidden_states(model, fam, inputs))[0].float()


def isolation(model, samples: list[Encoded], device: str, k: int = 4) -> dict:
    """Packed row of the first k samples against each alone; and the leaking control."""
    part = samples[:k]
    batch = packed_batch(part)
    packed = logits_of(model, batch, device)
    leak_batch = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    leaky = logits_of(model, leak_batch, device)
    diff = leak = scale = 0.0
    start = 0
    for j, s in enumerate(part):
        alone = logits_of(model, packed_batch([s]), device)
        n = alone.shape[0]
        diff += float((packed[start:start + n] - alone).abs().sum())
        if j:   # the first sample sees nothing before it either way
            leak += float((leaky[start:start + n] - alone).abs().sum())
        scale += float(alone.abs().sum())
        start += n
    tokens = start
    first = len(part[0].input_ids)
    rel = diff / scale
    rel_leak = (leak / (tokens - first)) / (scale / tokens)
    return {"packed_vs_alone": rel, "control_leak": rel_leak, "tolerance": ISOLATION_TOL,
            "isolated": rel <= ISOLATION_TOL < rel_leak}


def run_kernel(kernel: str, shape: str, steps: int, device: str, chunk: int) -> dict:
    samples = make_samples(shape)
    tokens = sum(len(s.input_ids) for s in samples)
    supervised = sum(sum(x != -100 for x in s.labels[1:]) for s in samples)
    peak = peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    out = {"kernel": kernel, "samples": len(samples), "tokens": tokens, "supervised": supervised}
    model = build_model(shape, kernel, device)
    out["isolation"] = isolation(model, samples, device)
    flops = model_flops(model, [packed_batch(samples)])
    for mode in ("packed", "padded"):
        try:
            r = train_case(model, samples, mode, steps, device, chunk)
        except torch.cuda.OutOfMemoryError as exc:
            out[mode] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            torch.cuda.empty_cache()
            continue
        r.update(tokens_per_s=tokens / r["step_s"], supervised_tokens_per_s=supervised / r["step_s"],
                 mfu=flops / r["step_s"] / peak if peak else None)
        out[mode] = r
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def available_kernels(small: bool, device: str) -> list[str]:
    cap = attention.cuda_capability() if device == "cuda" else None
    out = ["sdpa"]
    if device == "cuda":
        out.append("flex_attention")
        out += [k for k in ("flash_attention_2", "flash_attention_3")
                if attention.importable(k) and (k != "flash_attention_3" or cap[0] == 9)]
    if small:
        out.append("eager")
    return out


def table(results: list[dict]) -> str:
    lines = ["| kernel | layout | step s | tokens/s | supervised tokens/s | peak GiB | MFU | packed_vs_alone / control |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        iso = r["isolation"]
        for mode in ("packed", "padded"):
            m = r[mode]
            if "error" in m:
                lines.append(f"| {r['kernel']} | {mode} | {m['error']} | | | | | |")
                continue
            mem = f"{m['peak_memory_gb']:.1f}" if m["peak_memory_gb"] is not None else "-"
            mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "-"
            lines.append(f"| {r['kernel']} | {mode} | {m['step_s']:.3f} | {m['tokens_per_s']:,.0f} | "
                         f"{m['supervised_tokens_per_s']:,.0f} | {mem} | {mfu} | "
                         f"{iso['packed_vs_alone']:.2e} / {iso['control_leak']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes; nothing to record (CI)")
    ap.add_argument("--kernels", help="comma-separated; default: every kernel available here")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=4096, help="loss.chunk_size")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.small:
        print("bench_gpu: no CUDA device; run with --small for the CPU check (no figures)", file=sys.stderr)
        return 2
    shape = "small" if a.small else "1b"
    kernels = a.kernels.split(",") if a.kernels else available_kernels(a.small, device)
    results = [run_kernel(k, shape, a.steps, device, a.chunk) for k in kernels]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"bench_gpu: {shape} shape on {name}, torch {torch.__version__}" +
          (" (small mode: shapes shrunk, no figures to record)" if a.small else ""))
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "shape": shape, "results": results}, indent=1))
    return 0 if all(r["isolation"]["isolated"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
