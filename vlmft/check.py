"""``vlmft check``: prove that packing is exact on the recipe's own model and data, in fp32,
before a GPU hour is spent.

On the first N usable samples of the recipe's datasets:

1. **plan == encode**: each sample's planned length (image expansion from header sizes) equals
   its encoded length (decoded images through the processor).
2. **isolation**: the samples are packed into rows exactly as training packs them (the recipe's
   packer and the training stream's row layout, vlmft/forward.py's inputs), and every sample's
   logits inside its row are compared with the sample run alone through the model's own forward
   (its token ids with all its processor outputs, the model's own positions and masks). Isolated
   means the largest difference is at most ``tolerance`` (1e-4).
3. **gradients**: one packed row's loss, backpropagated, reaches the vision tower and the
   projector (a parameter with a non-zero gradient in each).

It also returns one sample rendered with its supervised spans marked: what training learns.
"""

from __future__ import annotations

import torch

from .loss import IGNORE_INDEX
from .recipe import Recipe

TOLERANCE = 1e-4


def check(recipe: Recipe, samples: int = 16, tolerance: float = TOLERANCE) -> dict:
    """The report as plain data (see the module docstring); raises RecipeError for a recipe
    whose data has no usable sample."""
    from .data.catalog import build_catalog
    from .data.stream import Materializer
    from .model import load_family, load_model
    from .recipe import RecipeError

    config, fam, processor = load_family(recipe.model, recipe.data)
    catalog = build_catalog(recipe, processor, limit=max(4 * samples, 32), workers=1)
    refs = list(range(min(samples, len(catalog.samples))))
    if not refs:
        raise RecipeError(["data.datasets: no usable sample to check (dropped: "
                           + ", ".join(f"{k}={v}" for k, v in catalog.dropped.items()) + ")"])
    model = load_model(recipe.model, "fp32").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    mat = Materializer(recipe, catalog, processor)
    encs, mismatches = _encodings(processor, catalog, mat, refs)
    rows = [[i for i in p if i in encs] for p in _packs(recipe, catalog, refs)]
    rows = [r for r in rows if r]
    worst, per_sample = 0.0, []
    for row in rows:
        for i, diff in _row_diffs(model, fam, mat, [encs[i] for i in row], row, device):
            per_sample.append({"sample": catalog.records[catalog.samples[i].record].where, "max_abs_logit_diff": diff})
            worst = max(worst, diff)
    grads = _gradient_reach(model, fam, mat, rows, catalog, recipe, device)
    return {"model": recipe.model.name_or_path, "family": fam.name, "model_type": config.model_type,
            "num_samples_checked": len(encs), "rows": len(rows), "max_abs_logit_diff": worst,
            "tolerance": tolerance, "isolated": worst <= tolerance,
            "plan_matches_encode": not mismatches, "plan_mismatches": mismatches,
            "gradients": grads, "samples": per_sample,
            "rendered": _render(processor, encs, catalog), "dropped": dict(catalog.dropped)}


def passed(report: dict) -> bool:
    return report["isolated"] and report["plan_matches_encode"]


def _encodings(processor, catalog, mat, refs):
    """Encoded samples by catalog index, and the plan != encode cases."""
    from .data import chat, tokens
    from .data.catalog import max_tiles, segments
    from .data.images import ImageProblem

    encs, mismatches = {}, []
    for i in refs:
        ref = catalog.samples[i]
        rec = catalog.records[ref.record]
        try:
            segs = segments(processor, catalog, rec)
            enc = tokens.encode(processor, segs, max_tiles(mat.recipe, catalog, rec))
        except (chat.BadSample, ImageProblem):
            continue  # a bad sample: training drops it too
        planned = ref.planned or ref.length
        if len(enc.input_ids) != planned:
            mismatches.append({"sample": rec.where, "planned": planned, "encoded": len(enc.input_ids)})
            continue
        if len(enc.input_ids) > ref.length:
            enc = tokens.truncate(enc, ref.length, tokens.image_ids(processor))
        encs[i] = enc
    return encs, mismatches


def _packs(recipe, catalog, refs):
    """The rows training would build from these samples (the recipe's packer)."""
    from .data import packing
    from .data.stream import packer_args

    cfg = recipe.data.packing
    if not cfg.enabled:
        return [[i] for i in refs]
    limits, knobs = packer_args(recipe.data)
    lengths = [catalog.samples[i].length for i in refs]
    tiles = [catalog.samples[i].tiles for i in refs]
    return [[refs[j] for j in p] for p in packing.pack(lengths, tiles, limits, strategy=cfg.strategy, **knobs)]


@torch.no_grad()
def _row_diffs(model, fam, mat, encs, row, device):
    from .data.stream import row as lay_out
    from .forward import hidden_states, model_inputs, to_device

    batch = lay_out(encs, [1.0] * len(encs), fam)
    inputs = to_device(model_inputs(fam, model, batch), device)
    packed = model.get_output_embeddings()(hidden_states(model, fam, inputs))[0].float()
    start = 0
    for i, enc in zip(row, encs):
        kw = {"input_ids": torch.tensor([enc.input_ids], device=device), **to_device(enc.vision, device)}
        if fam.token_key:
            kw[fam.token_key] = torch.tensor([enc.token_row], device=device)
        alone = model(**kw, use_cache=False).logits[0].float()
        n = alone.shape[0]
        yield i, (packed[start:start + n] - alone).abs().max().item()
        start += n


def _gradient_reach(model, fam, mat, rows, catalog, recipe, device) -> dict:
    """Does one packed row's loss reach each tower? (the first row holding an image)"""
    from .forward import LossModule, model_inputs, to_device
    from .loss import token_weights
    from .optim import place

    row = next((r for r in rows if any(catalog.samples[i].tiles for i in r)), rows[0])
    batch = mat.micro_batch([row])
    module = LossModule(model, fam, recipe.loss.chunk_size)
    w = token_weights(batch["labels"], batch["sample_ids"], batch["loss_weight"], recipe.loss.reduction)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        module(to_device(model_inputs(fam, model, batch), device), w.to(device)).backward()
    reach: dict[str, bool] = {}
    for name, p in model.named_parameters():
        tower = place(name)[0] or "other"
        reach[tower] = reach.get(tower, False) or bool(p.grad is not None and p.grad.abs().sum() > 0)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    model.zero_grad(set_to_none=True)
    return reach


def _render(processor, encs: dict, catalog) -> dict:
    """One sample (the first with an image) as (text, supervised) pieces; runs of an image
    token are shown once with their count."""
    from .data import tokens

    if not encs:
        return {}
    i = next((k for k, e in encs.items() if e.vision), next(iter(encs)))
    enc, img = encs[i], tokens.image_ids(processor)
    pieces: list[list] = []
    k, ids = 0, enc.input_ids
    while k < len(ids):
        j = k
        if ids[k] in img:
            while j < len(ids) and ids[j] == ids[k]:
                j += 1
            text = processor.tokenizer.decode([ids[k]]) + (f"x{j - k}" if j - k > 1 else "")
        else:
            sup = enc.labels[k] != IGNORE_INDEX
            while j < len(ids) and ids[j] not in img and (enc.labels[j] != IGNORE_INDEX) == sup:
                j += 1
            text = processor.tokenizer.decode(ids[k:j])
        sup = enc.labels[k] != IGNORE_INDEX
        if pieces and pieces[-1][1] == sup:
            pieces[-1][0] += text
        else:
            pieces.append([text, sup])
        k = j
    return {"sample": catalog.records[catalog.samples[i].record].where, "pieces": pieces}


def render(report: dict):
    """The report for a terminal (rich)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ok = lambda b: "[green]yes[/green]" if b else "[red]NO[/red]"  # noqa: E731
    t = Table(title=f"vlmft check: {report['model']} ({report['family']}, {report['model_type']})",
              show_header=False, title_justify="left")
    t.add_row("samples checked", f"{report['num_samples_checked']} in {report['rows']} packed row(s)")
    t.add_row("packed == alone", f"{ok(report['isolated'])}  max |logit diff| "
              f"{report['max_abs_logit_diff']:.2e} (tolerance {report['tolerance']:.0e})")
    t.add_row("plan == encode", ok(report["plan_matches_encode"])
              + "".join(f"\n  {m['sample']}: planned {m['planned']}, encoded {m['encoded']}"
                        for m in report["plan_mismatches"]))
    t.add_row("gradient reaches", ", ".join(f"{k} {ok(v)}" for k, v in report["gradients"].items()))
    parts = [t]
    if report["rendered"]:
        text = Text(f"\n{report['rendered']['sample']} (supervised in green):\n")
        for piece, sup in report["rendered"]["pieces"]:
            text.append(piece, style="bold green" if sup else "dim")
        parts.append(text)
    return Group(*parts)
