"""Per-dataset training loss (train/<name>/loss in metrics.jsonl) against each sample of the
step alone through the model's own forward (tests/eval_reference.py), and the adaptive weights
put on a micro-batch's tokens, by hand."""

from __future__ import annotations

import json

import pytest
import torch

from vlmft.recipe import load

from .conftest import DEMO, ROOT
from .eval_reference import reduced, sample_ce

RECORDS = [json.loads(x) for x in (ROOT / "demo" / "data" / "train.jsonl").read_text().splitlines()]


def split(tmp_path) -> list[str]:
    pics = [r for r in RECORDS if "image" in r]
    words = [r for r in RECORDS if "image" not in r]
    for name, rows in (("pics", pics), ("words", words)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = ROOT / "demo" / "data"
    return [f"data.datasets=[{{path: '{tmp_path}/pics.jsonl', image_root: '{root}'}}, "
            f"{{path: '{tmp_path}/words.jsonl', loss_weight: 3.0}}]", "data.eval=[]"]


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_per_dataset_loss_of_a_step_equals_the_models_own(reduction, tmp_path, processor, in_root, dist_env):
    from vlmft.data.catalog import build_catalog
    from vlmft.data.stream import PackPlan
    from vlmft.model import load_model
    from vlmft.train import train

    recipe = load(DEMO, split(tmp_path) + [f"output_dir={tmp_path}/run", "train.max_steps=1",
                                           "train.grad_accum_steps=3", f"loss.reduction={reduction}",
                                           "data.step_balance=dataset"])
    catalog = build_catalog(recipe, processor)
    step = [catalog.samples[i] for pack in PackPlan(recipe, catalog).step(0, world=1) for i in pack]
    model = load_model(recipe.model).eval()      # the weights the first step computes its loss with
    root = ROOT / "demo" / "data"
    per = {0: [], 1: []}
    for ref in step:
        per[ref.dataset].append(sample_ce(processor, model, catalog.records[ref.record].data, root))
    assert per[0] and per[1]                     # the step holds both datasets
    train(recipe)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["train/pics/loss"] - reduced(per[0], reduction)) <= 1e-5
    assert abs(row["train/words/loss"] - reduced(per[1], reduction)) <= 1e-5
    d = [1.0] * len(per[0]) + [3.0] * len(per[1])
    assert abs(row["loss"] - reduced(per[0] + per[1], reduction, d)) <= 1e-5


def test_adaptive_weights_multiply_each_tokens_loss_weight_by_its_dataset(tmp_path, processor, in_root):
    from vlmft.data.adaptive import AdaptiveWeights
    from vlmft.data.catalog import build_catalog
    from vlmft.data.stream import Materializer
    from vlmft.train_eval import weigh

    recipe = load(DEMO, split(tmp_path))
    catalog = build_catalog(recipe, processor)
    first = {ds: next(i for i, s in enumerate(catalog.samples) if s.dataset == ds) for ds in (0, 1)}
    batch = Materializer(recipe, catalog, processor).micro_batch([[first[1], first[0]], [first[1]]])
    aw = AdaptiveWeights(["pics", "words"], "progress", floor=0.1, cap=10.0, smoothing=0.0)
    aw.update({"pics": 2.0, "words": 2.0})
    aw.update({"pics": 1.0, "words": 1.5})       # words fell slower: 1.5 / 1.25 = 1.2, pics 0.8
    used = weigh(aw, catalog.datasets, [batch])
    assert used == {"adaptive/pics/weight": pytest.approx(0.8), "adaptive/words/weight": pytest.approx(1.2)}
    n = [catalog.samples[i].length for i in (first[1], first[0], first[1])]
    want = [3.0 * 1.2] * n[0] + [0.8] * n[1] + [3.0 * 1.2] * n[2]   # words x3 (its loss_weight), in order
    assert batch["loss_weight"][0].tolist() == pytest.approx(want)
    assert weigh(None, catalog.datasets, [batch]) == {}
    assert torch.equal(batch["loss_weight"][0], torch.tensor(want, dtype=torch.float32))


def test_weighted_ce_sum_splits_its_sum_by_group_exactly():
    """Each group's part of sum c_t l_t, by hand from the head's logits; a position of group -1
    (no dataset) or past the groups counts in the total only."""
    import torch.nn.functional as F

    from vlmft.loss import weighted_ce_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden, labels = torch.randn(1, 13, 8), torch.randint(0, 11, (1, 13))
    labels[0, 4] = -100
    w = torch.rand(1, 13)
    groups = torch.tensor([[0, 1, 1, 2, 0, -1, 2, 2, 0, 1, 3, 1, 0]])
    sums = torch.zeros(3, dtype=torch.float64)
    total = weighted_ce_sum(hidden, head, labels, w, chunk_size=4, groups=groups, group_sums=sums).detach()
    with torch.no_grad():
        ce = F.cross_entropy(head(hidden[0]).double(), labels[0], reduction="none", ignore_index=-100) * w[0].double()
    for g in range(3):
        assert float(sums[g]) == pytest.approx(float(ce[groups[0] == g].sum()), rel=1e-6)
    assert float(total) == pytest.approx(float(ce.sum()), rel=1e-6)
