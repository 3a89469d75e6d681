"""Evaluation (vlmft/eval.py) against references it shares no code with: each eval sample run
alone through the model's own forward on the stock image processor's pixels, its cross-entropy
and the reduction's weights written here; the blank-image loss from a black image of each
image's size; bad eval data counted, never skipped; the `vlmft eval` command."""

from __future__ import annotations

import json
import shutil

import pytest

from vlmft.recipe import RecipeError, load

from .conftest import DEMO, ROOT, vlmft
from .eval_reference import reduced, sample_ce

EVAL = ROOT / "demo" / "data" / "eval.jsonl"
LINES = EVAL.read_text().splitlines()


def two_sets(tmp_path) -> list[str]:
    """The demo's held-out questions split into two eval sets (a: 20 lines, b: the rest)."""
    (tmp_path / "a.jsonl").write_text("\n".join(LINES[:20]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(LINES[20:]) + "\n")
    root = ROOT / "demo" / "data"
    return [f"data.eval=[{{path: '{tmp_path}/a.jsonl', image_root: '{root}'}}, "
            f"{{path: '{tmp_path}/b.jsonl', name: bee, image_root: '{root}'}}]"]


def reference(processor, model, lines: list[str], reduction: str, blank: bool = False) -> float:
    root = ROOT / "demo" / "data"
    return reduced([sample_ce(processor, model, json.loads(x), root, blank) for x in lines], reduction)


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_eval_loss_per_set_and_blank_images_equal_the_models_own(reduction, tmp_path, processor, in_root, dist_env):
    from vlmft.eval import evaluate
    from vlmft.model import load_model

    recipe = load(DEMO, two_sets(tmp_path) + [f"loss.reduction={reduction}", "train.micro_batch_size=2",
                                              f"output_dir={tmp_path}/run"])
    result = evaluate(recipe, None, generate=False)
    model = load_model(recipe.model).eval()
    sets = {"a": LINES[:20], "bee": LINES[20:]}
    assert list(result["datasets"]) == ["a", "bee"]
    for name, lines in sets.items():
        got = result["datasets"][name]
        assert got["samples"] == len(lines) and got["bad_samples"] == 0 and got["dropped"] == 0
        assert abs(got["loss"] - reference(processor, model, lines, reduction)) <= 2e-5
        blank = reference(processor, model, lines, reduction, blank=True)
        assert abs(got["loss_blank_images"] - blank) <= 2e-5
        assert got["visual_gap"] == pytest.approx(got["loss_blank_images"] - got["loss"])
        assert got["image_samples"] == sum("image" in json.loads(x) for x in lines)
    assert abs(result["overall"]["loss"] - reference(processor, model, LINES, reduction)) <= 2e-5
    assert "exact_match" not in result["overall"]


def test_bad_eval_data_is_counted_and_reported(tmp_path, processor, in_root, dist_env):
    """Planning drops (invalid JSON, a missing image) are counted per set with file:line and
    stop the run past data.max_bad_fraction like training data; an image that fails to load
    at evaluation time is counted as a bad sample, and the set's figures leave it out."""
    from vlmft.eval import Evaluator
    from vlmft.eval_data import drop_lines
    from vlmft.forward import LossModule
    from vlmft.model import load_model
    from vlmft.models import family_of

    (tmp_path / "images").mkdir()
    for line in LINES[:6]:
        for p in ([json.loads(line)["image"]] if isinstance(json.loads(line).get("image"), str)
                  else json.loads(line).get("image", [])):
            shutil.copy(ROOT / "demo" / "data" / p, tmp_path / p)
    bad = json.loads(LINES[0]) | {"image": "images/nowhere.png"}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(LINES[:6] + ["{not json", json.dumps(bad)]) + "\n")
    over = [f"data.eval=[{{path: '{path}'}}]", f"output_dir={tmp_path}/run"]
    with pytest.raises(RecipeError) as e:       # 2 of 8 dropped > max_bad_fraction 0.01
        Evaluator(load(DEMO, over), processor, ["train"], 0, 1)
    assert any("data.eval: dataset 'mixed'" in x and "2 of 8 samples dropped" in x for x in e.value.errors)
    recipe = load(DEMO, over + ["data.max_bad_fraction=0.5"])
    ev = Evaluator(recipe, processor, ["train"], 0, 1)
    table = "\n".join(drop_lines(ev.data.catalog))
    assert "invalid_json: 1" in table and "missing_image: 1" in table and f"{path}:7" in table
    first_image = json.loads(LINES[0])["image"]
    (tmp_path / first_image).write_bytes(b"")   # planned from its header, gone bad since
    model = load_model(recipe.model).eval()
    result = ev.run(LossModule(model, family_of(processor), 64), model, "base")
    got = result["datasets"]["mixed"]
    assert got["dropped"] == 2 and got["dropped_reasons"] == {"invalid_json": 1, "missing_image": 1}
    assert got["bad_samples"] == 1 and got["samples"] == 5
    assert ev.data.catalog.dropped["empty_image"] == 1
    from vlmft.eval import summary

    assert summary(result).endswith("not evaluated: 2 dropped while planning (invalid_json 1, "
                                    "missing_image 1), 1 failed to load")


def test_eval_command_json_and_predictions(tmp_path, in_root):
    """`vlmft eval --data FILE --json`: the issue's object, predictions on disk, the base model."""
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(LINES[:6]) + "\n")
    (tmp_path / "images").symlink_to(ROOT / "demo" / "data" / "images")
    p = vlmft("eval", str(DEMO), f"output_dir={tmp_path}/run", "eval.max_new_tokens=4",
              "--data", str(data), "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    row = out["datasets"]["q"]
    assert set(row) >= {"samples", "loss", "loss_blank_images", "visual_gap", "exact_match"}
    assert row["samples"] == 6 and row["exact_match"] == 0.0
    refs = [json.loads(x)["conversations"][-1]["value"] for x in LINES[:6]]
    short = [r for r in refs if len(r.split()) <= 2]         # <= 4 tokens of the demo tokenizer
    assert row["answered"] == len(short) >= 2
    preds = [json.loads(x) for x in (tmp_path / "run" / "eval" / "base" / "q.jsonl").read_text().splitlines()]
    assert [x["reference"] for x in preds] == short
    assert all(set(x) >= {"id", "prompt", "reference", "prediction"} for x in preds)
    assert preds[0]["prompt"].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("args, message", [
    (["data.eval=[]"], "data.eval: no evaluation datasets; add data.eval to the recipe or pass --data FILE"),
    (["--model", "nowhere"], "--model: 'nowhere' is neither an HF model folder"),
    (["data.eval.0.measures=nope", "data.adaptive=progress", "eval.every_steps=2"],
     "data.eval[0].measures: 'nope' is not a training dataset"),
])
def test_eval_command_mistakes_are_one_line(args, message, in_root):
    p = vlmft("eval", str(DEMO), "--no-generate", *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and message in lines[0] and all(x.startswith("error ") for x in lines), p.stderr


def test_an_output_dir_holding_only_eval_predictions_is_not_yet_a_run(tmp_path):
    from vlmft import run_dir

    (tmp_path / "eval" / "base").mkdir(parents=True)
    assert run_dir.refusal(str(tmp_path), None, False) is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert "already holds a run" in run_dir.refusal(str(tmp_path), None, False)
    assert "eval" in run_dir.clear(str(tmp_path))


@pytest.mark.parametrize("override, message", [
    (["data.eval=[]", "eval.every_steps=5"], "eval.every_steps: only used with evaluation datasets (data.eval)"),
    (["data.eval=[]", "eval.generate=true"], "eval.generate: only used with evaluation datasets"),
    (["data.eval=[{path: nope.jsonl}]"], "data.eval[0].path: file 'nope.jsonl' not found"),
    (["data.eval=[{path: demo/data/eval.jsonl}, {path: demo/data/eval.jsonl}]"], "data.eval: two sets share a name"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens: must be > 0"),
    (["log.wandb_project=x"], "log.wandb_project: only used with log.wandb=true"),
])
def test_recipe_checks_the_eval_keys(override, message, in_root):
    with pytest.raises(RecipeError) as e:
        load(DEMO, override)
    assert any(message in line for line in e.value.errors), e.value.errors


def test_visual_reliance_off_leaves_the_blank_pass_out(tmp_path, processor, in_root, dist_env):
    from vlmft.eval import Evaluator, metrics
    from vlmft.forward import LossModule
    from vlmft.model import load_model
    from vlmft.models import family_of

    model = load_model(load(DEMO).model).eval()
    calls = []
    hook = model.model.get_image_features
    model.model.get_image_features = lambda *a, **k: calls.append(1) or hook(*a, **k)
    for on in (True, False):
        recipe = load(DEMO, [f"eval.visual_reliance={str(on).lower()}", f"output_dir={tmp_path}"])
        ev = Evaluator(recipe, processor, ["train"], 0, 1)
        calls.clear()
        result = ev.run(LossModule(model, family_of(processor), 64), model, "base")
        keys = set(metrics(result))
        assert ("eval/heldout/visual_gap" in keys) is on and ("loss_blank_images" in result["overall"]) is on
        if on:
            with_blank = len(calls)
        else:
            assert 0 < len(calls) < with_blank          # the images ran once, not twice


@pytest.mark.parametrize("zero", [0, 2])
def test_eval_of_a_checkpoint_equals_the_evaluation_training_made_there(zero, tmp_path, in_root, dist_env):
    """`vlmft eval --model checkpoints/stepN` puts the checkpoint's weights (ZeRO stage 0: the
    module file; 1-3: DeepSpeed's zero_to_fp32) into the base model: its loss is the one the
    training run measured at step N."""
    from vlmft.eval import evaluate
    from vlmft.train import train

    recipe = load(DEMO, [f"output_dir={tmp_path}/run", "train.max_steps=3", "checkpoint.every_steps=2",
                         "eval.every_steps=2", f"engine.zero_stage={zero}"])
    train(recipe)
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    got = evaluate(recipe, str(tmp_path / "run" / "checkpoints" / "step2"), generate=False)
    assert got["label"] == "step2"
    for key in ("loss", "loss_blank_images"):
        assert abs(got["datasets"]["heldout"][key] - row[f"eval/heldout/{key}"]) <= 1e-6
    base = evaluate(recipe, None, generate=False)["datasets"]["heldout"]["loss"]
    assert abs(base - got["datasets"]["heldout"]["loss"]) > 0.1
