"""The catalog: every record read, planned without decoding pixels, or dropped and counted.

Planning a sample costs its chat template and tokenization plus one header read per image
(cached per path); the packer needs only (length, tiles), so a pack plan never waits on image
decoding. Records are planned in chunks of ``CHUNK`` (their text tokenized in one batch); with
many records the chunks go to a pool of forked worker processes (``workers``), and the
results are merged in record order, so the catalog is the same whatever the worker count.

Bad samples. Each is counted under its own reason, with the first few ``file:line: detail``
kept as examples (:data:`REASONS` lists them), per dataset too, and never replaced by another
sample; a too_long or too_many_tiles drop also records the limit that would have kept it
(``needs``). vlmft/data/drops.py reports them and judges data.max_bad_fraction. A sample
whose supervised tokens are below ``data.packing.min_active_tokens_ratio`` of its length
(InternVL's check_valid) is dropped the same way, as ``low_supervised_ratio``. Under
``data.on_bad_sample: error`` the first one (in record order) stops the run with a
:class:`RecipeError` that names ``file:line`` and how to fix it.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..models import family_of
from ..recipe import Recipe, RecipeError
from . import chat, sources, tokens
from .images import ImageProblem

EXAMPLES_PER_REASON = 3
CHUNK = 512              # records planned (and tokenized) together
POOL_MIN_RECORDS = 8192  # fewer records than this are planned in-process

REASONS = {  # reason -> how to fix it (the hint of on_bad_sample=error)
    "invalid_json": "fix the line: each line must be one JSON object",
    "missing_key": "each record needs 'conversations': [{'from': ..., 'value': '...'}, ...] "
                   "('image': a path or a list of paths) or 'messages': [{'role': ..., "
                   "'content': ...}, ...] ('images': a list of paths)",
    "unknown_role": "use 'from': system, human or gpt (user and assistant are accepted too)",
    "image_count_mismatch": "give one '<image>' placeholder per image, in human turns only",
    "missing_image": "check the path, or set image_root / the meta JSON's 'root'",
    "empty_image": "replace the empty image file",
    "corrupt_image": "replace the file: pillow cannot read it as an image",
    "truncated_image": "re-download or re-encode the file: it ends early",
    "image_bomb": "the image has more pixels than the decompression-bomb guard allows; resize it",
    "no_supervised_tokens": "add a gpt turn: nothing in this sample would be trained on",
    "too_long": "raise data.packing.max_packed_tokens, lower data.max_tiles_per_image, or set "
                "data.packing.overlong=truncate",
    "too_many_tiles": "raise data.packing.num_images_expected or lower data.max_tiles_per_image",
    "template": "the chat template is not prefix-stable; please report the model",
    "no_image": "this model family (PaliGemma) takes no sample without an image; add one or drop the sample",
    "plan_mismatch": "please report the model: its processor expanded an image differently from the plan",
    "low_supervised_ratio": "lower data.packing.min_active_tokens_ratio, or give the sample more "
                            "answer (gpt) text against its prompt and images",
}


@dataclass
class SampleRef:
    dataset: int
    record: int          # index into Catalog.records
    length: int
    tiles: int
    n_supervised: int
    planned: int = 0     # the encoded length before truncation (0: the same as length)
    num_images: int = 0  # images in the sample (data.step_balance=modality)


@dataclass
class Catalog:
    """Every record read, the usable samples planned, and the dropped ones counted by reason."""
    datasets: list[sources.Dataset]
    records: list[sources.Record]
    samples: list[SampleRef] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))  # reason -> ["file:line: detail"]
    truncated: int = 0
    truncated_examples: list = field(default_factory=list)
    dropped_by_dataset: dict = field(default_factory=lambda: defaultdict(Counter))
    examples_by_dataset: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    needs: dict = field(default_factory=dict)  # (dataset, reason) -> the limit that keeps them all

    def drop(self, reason: str, where: str, detail: str = "", dataset: int | None = None,
             need: int = 0) -> None:
        self.dropped[reason] += 1
        example = f"{where}: {detail}" if detail else where
        _keep(self.examples[reason], example)
        if dataset is not None:
            self.dropped_by_dataset[dataset][reason] += 1
            _keep(self.examples_by_dataset[dataset][reason], example)
            if need:
                self.needs[dataset, reason] = max(need, self.needs.get((dataset, reason), 0))


def _keep(examples: list, example: str) -> None:
    """The first EXAMPLES_PER_REASON distinct examples (repeat_time repeats a record)."""
    if len(examples) < EXAMPLES_PER_REASON and example not in examples:
        examples.append(example)


def build_catalog(recipe: Recipe, processor, *, limit: int = 0, on_step=None,
                  workers: int | None = None) -> Catalog:
    """Read and plan every record (no pixels decoded). ``on_step(done, total)`` reports
    progress in records. ``workers``: planning processes (None = one per CPU, up to 8, when
    there are at least POOL_MIN_RECORDS records; 0 or 1 = in this process)."""
    datasets = sources.expand(recipe.data.datasets)
    records = []
    for i, ds in enumerate(datasets):
        records += sources.read(i, ds, recipe.train.seed, limit=limit)
    cat = Catalog(datasets, records)
    strict = recipe.data.on_bad_sample == "error"
    n = len(records)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= POOL_MIN_RECORDS else 1
    workers = min(workers, -(-n // CHUNK)) if n else 1
    with _gc_paused():
        _collect(recipe, processor, cat, workers, strict, on_step)
    return cat


@contextlib.contextmanager
def _gc_paused():
    """Planning allocates many small acyclic objects while the records stay alive: the cyclic
    collector would rescan them all again and again (a third of the time, measured). Frozen
    objects are also not touched by forked workers' collectors (no copy-on-write)."""
    enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def _collect(recipe, processor, cat: Catalog, workers: int, strict: bool, on_step) -> None:
    records, n, done = cat.records, len(cat.records), 0
    for start, results in _plan_chunks(recipe, processor, cat, workers):
        for k, res in enumerate(results):
            idx = start + k
            rec = records[idx]
            if isinstance(res, tuple):
                length, tiles, n_sup, truncated, planned, nimg = res
                cat.samples.append(SampleRef(rec.dataset, idx, length, tiles, n_sup, planned, nimg))
                if truncated:
                    cat.truncated += 1
                    if len(cat.truncated_examples) < EXAMPLES_PER_REASON:
                        cat.truncated_examples.append(f"{rec.where}: {truncated}")
                continue
            if strict:
                raise RecipeError([bad_sample_message(rec.where, res.reason, res.detail)])
            cat.drop(res.reason, rec.where, res.detail, rec.dataset, res.need)
        done += len(results)
        if on_step:
            on_step(done, n)


def bad_sample_message(where: str, reason: str, detail: str) -> str:
    hint = REASONS.get(reason, "fix or remove the record")
    return (f"{where}: bad sample ({reason}){': ' + detail if detail else ''}; {hint} "
            "(or set data.on_bad_sample=skip to count and skip such samples)")


# ---------------------------------------------------------------- planning, in chunks

def _plan_chunks(recipe, processor, cat: Catalog, workers: int):
    """Yield (start, results) per chunk, in record order; a result is plan_records' tuple or a
    BadSample."""
    ranges = [(s, min(s + CHUNK, len(cat.records))) for s in range(0, len(cat.records), CHUNK)]
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for s, e in ranges:
            yield s, plan_records(recipe, processor, cat, s, e)
        return
    global _STATE
    _STATE = (recipe, processor, cat)
    # the workers tokenize single-threaded (two levels of parallelism would fight); setting this
    # before the fork also keeps tokenizers from warning about a fork after parallel use
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        for (s, _), results in zip(ranges, pool.imap(_work, ranges)):
            yield s, results
    finally:
        pool.terminate()
        pool.join()
        _STATE = None


_STATE = None  # (recipe, processor, catalog) inherited by forked workers; nothing is pickled in


def _work(span):
    recipe, processor, cat = _STATE
    return plan_records(recipe, processor, cat, *span)


def plan_records(recipe: Recipe, processor, cat: Catalog, start: int, end: int) -> list:
    """Plan records[start:end]: each becomes (length, tiles, n_supervised, truncation note,
    length before truncation or 0, images) or the BadSample that drops it."""
    packing = recipe.data.packing
    cap, tile_cap = packing.max_packed_tokens, packing.num_images_expected
    ratio = packing.min_active_tokens_ratio
    out: list = [None] * (end - start)
    todo, items = [], []
    for k in range(end - start):
        rec = cat.records[start + k]
        try:
            mt = max_tiles(recipe, cat, rec)
            items.append((segments(processor, cat, rec), mt))
            todo.append(k)
        except (chat.BadSample, ImageProblem) as exc:
            out[k] = chat.BadSample(exc.reason, exc.detail)
    needs_image = family_of(processor).needs_image
    for k, (segs, mt), p in zip(todo, items, tokens.plan_many(processor, items)):
        if isinstance(p, ImageProblem):
            out[k] = chat.BadSample(p.reason, p.detail)
        elif needs_image and p.num_images == 0:
            out[k] = chat.BadSample("no_image", "a text-only sample; this model family needs an image per sample")
        elif p.n_supervised == 0:
            out[k] = chat.BadSample("no_supervised_tokens", "no assistant token to train on")
        elif p.length > cap and packing.overlong == "drop":
            out[k] = chat.BadSample("too_long", f"{p.length} tokens > max_packed_tokens={cap}", p.length)
        elif p.length > cap and (t := tokens.truncated_plan(processor, segs, mt, cap)) is None:
            out[k] = chat.BadSample("too_long", f"{p.length} tokens > max_packed_tokens={cap} and "
                                    "no cut at a text boundary after the images keeps a supervised token",
                                    p.length)
        elif tile_cap and p.tiles > tile_cap:
            out[k] = chat.BadSample("too_many_tiles", f"{p.tiles} tiles > num_images_expected={tile_cap}",
                                    p.tiles)
        elif p.length > cap:
            out[k] = (t.length, t.tiles, t.n_supervised, f"truncated {p.length} -> {cap} tokens", p.length,
                      t.num_images)
        else:
            out[k] = (p.length, p.tiles, p.n_supervised, "", 0, p.num_images)
        if isinstance(out[k], tuple) and out[k][2] < ratio * out[k][0]:   # InternVL's check_valid
            out[k] = chat.BadSample("low_supervised_ratio", f"{out[k][2]} of {out[k][0]} tokens "
                                    f"supervised < min_active_tokens_ratio={ratio}")
    return out


def segments(processor, cat: Catalog, rec: sources.Record) -> list[chat.Segment]:
    if rec.error:
        raise chat.BadSample(rec.error, rec.detail)
    return chat.sample_segments(processor, rec.data, cat.datasets[rec.dataset].image_root)


def max_tiles(recipe: Recipe, cat: Catalog, rec: sources.Record) -> int:
    return cat.datasets[rec.dataset].max_dynamic_patch or recipe.data.max_tiles_per_image
