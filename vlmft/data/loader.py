"""This rank's micro-batches, step by step, built in DataLoader workers; and the bad-data limit.

The training loop's data lines (``client_state`` = what the checkpoint was saved with)::

    loader = StepLoader(recipe, catalog, processor, rank, world, start_step=start)
    if client_state and "data" in client_state:      # O(1) resume: no round is replayed
        loader.load_state_dict(client_state["data"])
    for step, batches, data_wait_s in loader:        # this rank's grad_accum_steps micro-batches
        r = train_step(eng, batches, recipe, world)  # then, to checkpoint after this step:
        ds.save(..., client_state={"step": step + 1, "data": loader.state_dict()})

Each micro-batch is :meth:`Materializer.micro_batch`'s dict (input_ids, position_ids,
sample_ids, labels, loss_weight, pixel_values, num_samples, num_bad). Every rank yields exactly
``grad_accum_steps`` micro-batches per step whatever goes bad (an all-bad micro-batch is one
pad token of weight 0), so ranks never disagree on the number of forward/backward calls.

``data.num_workers: auto`` (the default) is :func:`workers_per_rank`: with a CUDA GPU the CPUs
this process may run on, shared among the machine's ranks, less one for the rank itself, at
most 8; without a GPU 0 (the training step itself computes on those CPUs). On CUDA the
workers' tensors come back in pinned memory (the DataLoader's pin thread), which
vlmft/forward.py's ``to_device`` copies without blocking.

With ``data.num_workers = 0`` the micro-batches are built in this process when the step is
asked for (``data_wait_s`` = the build time). With workers, each micro-batch is one task of a
torch DataLoader with ``in_order=False`` and one task per worker at a time: a task goes to
whichever worker is free, so no task ever queues behind a slow one, and results come back as
they finish. A background thread keeps the workers fed and puts results in a reorder buffer;
up to ``data.prefetch_steps`` steps of micro-batches are built ahead of the one training, and
while the loop waits on a slow micro-batch the other workers keep building the ones after it.
``data_wait_s`` is the time the loop blocked waiting for this step's micro-batches. Samples that
fail in a worker are recorded in this process's ``catalog.dropped`` as they arrive.
"""

from __future__ import annotations

import threading
import time

from ..recipe import Recipe
from ..runtime import cpus_available, local_world_size
from .catalog import Catalog
from .stream import Materializer, PackPlan

_WAIT = "wait"   # a task that builds nothing: issued while the workers are far enough ahead
_WAIT_S = 0.02


def bad_fraction_error(bad: int, seen: int, max_fraction: float, *,
                       examples: dict | None = None) -> str | None:
    """The message that stops training when more than ``max_fraction`` of the samples read were
    bad, else None. ``bad`` = samples dropped while planning (every reason) plus samples that
    failed to materialize since; ``seen`` = samples read: the catalog's records plus samples
    materialized since (good and bad). Pass counts summed over all ranks (so every rank decides
    the same). No floor: the first bad sample over the fraction stops even a small run.
    ``examples``: reason -> ["file:line: detail"] for the message."""
    if bad <= max_fraction * seen:
        return None
    msg = (f"{bad} of {seen} samples read were bad ({100 * bad / max(seen, 1):.2f}%), more than "
           f"data.max_bad_fraction={max_fraction:g}")
    if examples:
        msg += "; e.g. " + "; ".join(f"{r}: {ex[0]}" for r, ex in examples.items() if ex)
    return msg + ". Fix or remove those samples, or raise data.max_bad_fraction."


MAX_AUTO_WORKERS = 8


def workers_per_rank(setting: int | str, cuda: bool | None = None, cpus: int | None = None,
                     ranks: int | None = None) -> int:
    """DataLoader workers of each rank for ``data.num_workers`` (a number, or ``auto``)."""
    if setting != "auto":
        return int(setting)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return 0
    share = (cpus or cpus_available()) // (ranks or local_world_size())
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


class _Tasks:
    """What workers run: task (t, packs) -> (t, micro-batch, bad log); _WAIT sleeps briefly."""

    def __init__(self, recipe: Recipe, catalog: Catalog, processor):
        self.recipe, self.catalog, self.processor = recipe, catalog, processor
        self.mat = None

    def __getitem__(self, task):
        if task == _WAIT:
            time.sleep(_WAIT_S)
            return _WAIT
        t, packs = task
        if self.mat is None:
            self.mat = Materializer(self.recipe, self.catalog, self.processor)
        return t, self.mat.micro_batch(packs), self.mat.bad_log


def _identity(x):
    return x


class StepLoader:
    """Iterate ``(step, batches, data_wait_s)`` for steps start_step .. train.max_steps - 1.

    ``plan``: a :class:`PackPlan` to share (one is built otherwise). ``state_dict()`` is
    ``{"step": next step, "plan": plan state}``; ``load_state_dict`` takes it (or ``{"step": k}``
    alone, found by walking the plan's rounds) before iteration starts."""

    def __init__(self, recipe: Recipe, catalog: Catalog, processor, rank: int, world: int,
                 start_step: int = 0, plan: PackPlan | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.recipe, self.catalog, self.processor = recipe, catalog, processor
        self.rank, self.world = rank, world
        self.plan = plan or PackPlan(recipe, catalog)
        self.plan.global_batch(world)
        self.step = int(start_step)
        self.gas = recipe.train.grad_accum_steps
        self.workers = workers_per_rank(recipe.data.num_workers)

    def state_dict(self) -> dict:
        return {"step": self.step, "plan": self.plan.state_dict(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if "plan" in state:
            self.plan.load_state_dict(state["plan"])

    def micro_batches(self, step: int) -> list[list[list[int]]]:
        """This rank's micro-batches of ``step`` as packs of catalog sample indices."""
        return self.plan.rank_step(step, self.rank, self.world)

    def __iter__(self):
        if self.workers > 0:
            yield from self._workers()
            return
        mat = Materializer(self.recipe, self.catalog, self.processor)
        for step in range(self.step, self.recipe.train.max_steps):
            t0 = time.perf_counter()
            batches = [mat.micro_batch(p) for p in self.micro_batches(step)]
            wait = time.perf_counter() - t0
            self.step = step + 1
            yield step, batches, wait

    # ------------------------------------------------------------------ with workers

    def _workers(self):
        first, last = self.step, self.recipe.train.max_steps
        if first >= last:
            return
        total = (last - first) * self.gas            # task t = micro-batch t % gas of step first + t // gas
        ahead = max(self.recipe.data.prefetch_steps * self.gas, self.workers + 1)
        feed = _Feed(total, ahead)
        dl = self._data_loader(feed.tasks(first, self.gas, self.micro_batches))
        it = iter(dl)                                 # workers start here, in the caller's thread
        thread = threading.Thread(target=feed.pump, args=(it,), name="vlmft-data", daemon=True)
        thread.start()
        try:
            for step in range(first, last):
                base = (step - first) * self.gas
                t0 = time.perf_counter()
                batches = []
                for t in range(base, base + self.gas):
                    batch, bad = feed.take(t)
                    for reason, where, detail in bad:
                        self.catalog.drop(reason, where, detail)
                    batches.append(batch)
                wait = time.perf_counter() - t0
                self.step = step + 1
                yield step, batches, wait
        finally:
            feed.stop()

    def _data_loader(self, sampler):
        """The DataLoader that runs ``sampler``'s tasks on this rank's workers, results as they
        finish."""
        from torch.utils.data import DataLoader

        kw = dict(batch_size=None, sampler=sampler, num_workers=self.workers,
                  prefetch_factor=1, collate_fn=_identity, pin_memory=_cuda())
        try:
            return DataLoader(_Tasks(self.recipe, self.catalog, self.processor), in_order=False, **kw)
        except TypeError:   # torch < 2.6: results in task order (slower after a slow task, same data)
            return DataLoader(_Tasks(self.recipe, self.catalog, self.processor), **kw)


class _Feed:
    """What the task generator, the pump thread and the training loop share: counts of tasks
    issued, received and consumed under one condition, and the reorder buffer (task -> result).
    At most ``ahead`` tasks are issued past the last one consumed."""

    def __init__(self, total: int, ahead: int):
        self.total, self.ahead = total, ahead
        self.cond = threading.Condition()
        self.issued = self.received = self.consumed = 0
        self.error: BaseException | None = None
        self.stopped = self.done = False
        self.buf: dict[int, tuple] = {}

    def tasks(self, first: int, gas: int, micro_batches):
        """The DataLoader's sampler (runs on the pump thread): task (t, packs), or _WAIT while
        the workers are far enough ahead or after :meth:`stop`."""
        cache = (None, None)
        while self.issued < self.total:
            t = self.issued
            if t >= self.consumed + self.ahead or self.stopped:
                yield _WAIT
                continue
            step, m = first + t // gas, t % gas
            if cache[0] != step:
                cache = (step, micro_batches(step))
            self.issued += 1
            yield t, cache[1][m]

    def pump(self, it) -> None:
        """The background thread: move the DataLoader's results into the reorder buffer."""
        try:
            while True:
                with self.cond:   # nothing useful to receive while throttled: sleep until consumed
                    while (not self.stopped and self.received == self.issued
                           and self.issued >= self.consumed + self.ahead):
                        self.cond.wait()
                    if self.stopped or self.received == self.total:
                        break
                item = next(it)
                if item == _WAIT:
                    continue
                with self.cond:
                    self.buf[item[0]] = item
                    self.received += 1
                    self.cond.notify_all()
        except StopIteration:
            pass
        except BaseException as exc:  # a worker's error: re-raised in the training loop
            with self.cond:
                self.error = exc
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def take(self, t: int) -> tuple:
        """Task ``t``'s (micro-batch, bad log), waiting for it; raises a worker's error."""
        with self.cond:
            while t not in self.buf and self.error is None and not self.done:
                self.cond.wait()
            if t not in self.buf:
                raise self.error or RuntimeError("data workers stopped early")
            _, batch, bad = self.buf.pop(t)
            self.consumed = t + 1
            self.cond.notify_all()
        return batch, bad

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
