"""Which samples a round of training draws from each dataset.

Training runs in *rounds* of R samples (``data.round_size``; 0 = as many as the catalog holds,
so a round is an epoch). Round c draws q_i samples from dataset i, sum q_i = R, with

    size         p_i = n_i / sum n                   (InternVL's rule; n_i counts repeat_time)
    temperature  p_i = n_i^(1/tau) / sum n_j^(1/tau)  (tau = 1 is size, tau -> inf uniform)

and q_i = R p_i rounded by largest remainder (ties to the lower index), so the shares of every
round are exact to one sample per dataset. ``data.temperature_schedule=linear`` moves tau from
``data.temperature`` to ``data.temperature_end`` over training: a round's tau is taken at its
start, at progress = (packs before the round) / (train.max_steps x global batch).

Each dataset is read through its own endless sequence of permutations: pass y over dataset i is
a permutation seeded by (seed, i, y), and round c takes the next q_i positions. So a dataset is
never repeated before all its samples were seen (an upsampled small set runs several passes a
round; a downsampled large set spreads one pass over several rounds), and where a round stands
is one integer per dataset (its cursor). Under ``size`` with R = the catalog size each round
is exactly one pass over every dataset: an epoch, reshuffled per (seed, epoch).

Step balance (``data.step_balance``, M2-omni): the samples of a round are split into groups
(its datasets, or its modalities: text-only, one image, several images), each group is packed
on its own and its packs shuffled, and ``interleave`` lays the groups' packs out in one sequence,
each time taking the next pack of the group furthest below its share (the group's samples over
the round's samples) of the samples laid out so far. With two groups of shares p and 1 - p and
packs of at most n samples, a group's surplus (its samples laid out minus p x all laid
out) stays in [-p n, (1 - p) n] at every point, so ANY run of consecutive packs - a step,
whatever its size - holds the group's share to within one pack's samples (n); the surplus is
0 at the round's end, so a step across two rounds is held too (to the same bound when the two
rounds' shares are equal). The sequence depends on neither the global batch nor the ranks.

Pure numpy over the catalog's (dataset, length, tiles) arrays; no torch, no ranks.
"""

from __future__ import annotations

import numpy as np

# Stream tags: each random stream of the plan has its own, so none shares numbers with another.
TAG_DATASET, TAG_ROUND, TAG_PACKS, TAG_STEPS = 1, 2, 3, 4
MODALITIES = ("text-only", "one image", "several images")


def rng(seed: int, tag: int, *keys: int) -> np.random.Generator:
    """A generator fixed by (seed, tag, keys) alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, tag, *map(int, keys)]))


def weights(sizes, mixture: str = "size", tau: float = 1.0) -> np.ndarray:
    """Target share of each dataset (sums to 1; a dataset with no sample gets 0)."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.sum() <= 0:
        raise ValueError("no dataset has a usable sample")
    if mixture == "size":
        w = n
    elif mixture == "temperature":
        if tau <= 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
        w = np.zeros_like(n)
        pos = n > 0
        # n^(1/tau) computed in logs, scaled by the largest, so a large tau or size never overflows
        lw = np.log(n[pos]) / tau
        w[pos] = np.exp(lw - lw.max())
    else:
        raise ValueError(f"mixture: {mixture!r} is not one of size, temperature")
    return w / w.sum()


def quotas(p, total: int) -> np.ndarray:
    """Integers q with sum q = total and q_i within 1 of total x p_i (largest remainder)."""
    raw = np.asarray(p, dtype=np.float64) * total
    q = np.floor(raw).astype(np.int64)
    left = int(total - q.sum())
    if left > 0:
        order = np.lexsort((np.arange(len(raw)), -(raw - q)))   # largest remainder, then index
        q[order[:left]] += 1
    return q


def temperature_at(progress: float, start: float, end: float, schedule: str) -> float:
    """tau at a training progress in [0, 1] (clamped): constant, or linear from start to end."""
    if schedule == "constant":
        return float(start)
    if schedule == "linear":
        x = min(max(float(progress), 0.0), 1.0)
        return float(start + (end - start) * x)
    raise ValueError(f"temperature_schedule: {schedule!r} is not one of constant, linear")


class Mixture:
    """The mixture of a catalog under a recipe's data section.

    ``members[i]`` are the catalog sample indices of dataset i; ``draw(cursors, progress)``
    returns the round's samples (catalog indices, grouped by dataset, not yet shuffled) and the
    quotas the cursors advance by.
    """

    def __init__(self, dataset_of_sample, num_datasets: int, *, seed: int, mixture: str = "size",
                 temperature: float = 1.0, temperature_end: float = 1.0,
                 temperature_schedule: str = "constant", round_size: int = 0):
        ds = np.asarray(dataset_of_sample, dtype=np.int64)
        order = np.argsort(ds, kind="stable")
        bounds = np.searchsorted(ds[order], np.arange(num_datasets + 1))
        self.members = [order[bounds[i]:bounds[i + 1]] for i in range(num_datasets)]
        self.sizes = np.array([len(m) for m in self.members], dtype=np.int64)
        self.seed, self.mixture = seed, mixture
        self.t0, self.t1, self.schedule = temperature, temperature_end, temperature_schedule
        self.round_size = int(round_size) or int(self.sizes.sum())
        weights(self.sizes, mixture, temperature)          # fail early on a bad setting
        temperature_at(0.0, temperature, temperature_end, temperature_schedule)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_recipe(cls, recipe, catalog) -> Mixture:
        d = recipe.data
        return cls([s.dataset for s in catalog.samples], len(catalog.datasets),
                   seed=recipe.train.seed, mixture=d.mixture, temperature=d.temperature,
                   temperature_end=d.temperature_end, temperature_schedule=d.temperature_schedule,
                   round_size=d.round_size)

    def tau(self, progress: float) -> float:
        return temperature_at(progress, self.t0, self.t1, self.schedule)

    def shares(self, progress: float) -> np.ndarray:
        """Target share of each dataset at this training progress."""
        return weights(self.sizes, self.mixture, self.tau(progress))

    def quotas(self, progress: float) -> np.ndarray:
        return quotas(self.shares(progress), self.round_size)

    def take(self, i: int, start: int, count: int) -> np.ndarray:
        """Positions [start, start+count) of dataset i's endless sequence of passes."""
        n = int(self.sizes[i])
        out, pos, end = [], start, start + count
        while pos < end:
            y, k = divmod(pos, n)
            m = min(n - k, end - pos)
            out.append(self._perm(i, y)[k:k + m])
            pos += m
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _perm(self, i: int, y: int) -> np.ndarray:
        key = (i, y)
        p = self._perms.get(key)
        if p is None:
            if len(self._perms) > 4 * len(self.sizes) + 8:   # keep the recent passes only
                self._perms.clear()
            p = self.members[i][rng(self.seed, TAG_DATASET, i, y).permutation(int(self.sizes[i]))]
            self._perms[key] = p
        return p

    def draw(self, cursors, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """(catalog sample indices of the round, quotas). Cursors are positions per dataset."""
        q = self.quotas(progress)
        parts = [self.take(i, int(cursors[i]), int(q[i])) for i in range(len(q)) if q[i]]
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), q


def groups(samples, mode: str) -> np.ndarray:
    """Group id per catalog sample for ``data.step_balance``: its dataset, or its modality
    (index into MODALITIES)."""
    if mode == "dataset":
        return np.fromiter((s.dataset for s in samples), dtype=np.int64, count=len(samples))
    if mode == "modality":
        return np.fromiter((min(s.num_images, 2) for s in samples), dtype=np.int64, count=len(samples))
    raise ValueError(f"step_balance: {mode!r} is not one of dataset, modality")


def interleave(packs_by_group: list[list[list[int]]]) -> list[list[int]]:
    """The groups' packs (each group's in its given order) as one sequence that keeps every
    group at its share of the samples laid out so far (largest deficit first, ties to the
    lower group; see the module doc)."""
    count = np.array([sum(len(p) for p in g) for g in packs_by_group], dtype=np.float64)
    total = count.sum()
    if total == 0:
        return []
    share = count / total
    placed = np.zeros(len(count))
    left = np.array([len(g) for g in packs_by_group])
    nxt = [0] * len(count)
    out, laid = [], 0
    for _ in range(int(left.sum())):
        deficit = np.where(left > 0, share * laid - placed, -np.inf)
        g = int(np.argmax(deficit))
        p = packs_by_group[g][nxt[g]]
        nxt[g] += 1
        left[g] -= 1
        placed[g] += len(p)
        laid += len(p)
        out.append(p)
    return out
