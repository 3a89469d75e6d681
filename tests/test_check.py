"""``vlmft check`` passes where packing is exact, fails (exit 1) where it is not, and an
unsupported model type is one line and exit 2 before any weight is read."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlmft.cli import app
from vlmft.models.qwen_vl import QwenVL

from . import tiny_models
from .conftest import vlmft
from .test_families import write_data


def test_check_passes_on_the_demo(in_root):
    p = vlmft("check", "recipes/demo.yaml", "--json", "--samples", "12")
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    assert report["isolated"] and report["plan_matches_encode"]
    assert report["num_samples_checked"] == 12 and report["max_abs_logit_diff"] <= 1e-4
    assert report["rows"] >= 2                     # several samples per row, several rows
    assert report["gradients"] == {"vision": True, "projector": True, "language": True, "head": True}
    sup = "".join(t for t, s in report["rendered"]["pieces"] if s)
    assert sup.endswith("<|im_end|>") and "<IMG_CONTEXT>" not in sup


@pytest.fixture(scope="module")
def qwen_recipe(tmp_path_factory):
    data = write_data(tmp_path_factory.mktemp("check-data"))
    return ["recipes/demo.yaml", f"model.name_or_path={tiny_models.folder('qwen2_5_vl')}",
            f"data.datasets=[{{path: '{data}'}}]", "data.packing.max_packed_tokens=4096"]


def test_check_passes_on_qwen_and_fails_with_1d_positions(in_root, qwen_recipe, monkeypatch):
    runner = CliRunner()
    ok = runner.invoke(app, ["check", *qwen_recipe, "--json"])
    assert ok.exit_code == 0, ok.output[-2000:]
    assert json.loads(ok.stdout)["isolated"] is True
    # the test-only switch: Qwen fed the 1-D restarting ids other families take
    monkeypatch.setattr(QwenVL, "position_ids", lambda self, model, batch: batch["position_ids"])
    bad = runner.invoke(app, ["check", *qwen_recipe, "--json"])
    report = json.loads(bad.stdout)
    assert bad.exit_code == 1
    assert report["isolated"] is False and report["max_abs_logit_diff"] > 1e-2
    assert report["plan_matches_encode"] is True


@pytest.mark.parametrize("command", ["train", "check", "lr-table"])
def test_unsupported_model_type_is_one_line_before_weights(in_root, tmp_path, command):
    folder = tmp_path / "blip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "blip-2", "architectures": ["Blip2Model"]}))
    p = vlmft(command, "recipes/demo.yaml", f"model.name_or_path={folder}")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "model type 'blip-2' is not supported" in lines[0], lines
    assert "qwen2_5_vl" in lines[0] and "internvl" in lines[0]


def test_family_limits_are_refused_before_weights(in_root, tmp_path):
    """Qwen3.5's linear-attention layers cannot be packed exactly (training and evaluation);
    LLaVA has no tile limit."""
    folder = tmp_path / "q35"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    p = vlmft("train", "recipes/demo.yaml", f"model.name_or_path={folder}")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert p.stderr.startswith("error data.packing.enabled: qwen3_5 models cannot be packed")
    p = vlmft("eval", "recipes/demo.yaml", f"model.name_or_path={folder}")  # evaluation packs too
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert p.stderr.startswith("error data.packing.enabled: qwen3_5 models cannot be packed")
    p = vlmft("check", "recipes/demo.yaml", f"model.name_or_path={tiny_models.folder('llava')}",
              "data.max_tiles_per_image=4")
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        "error data.max_tiles_per_image: the llava family has no tile limit to set; leave it at 0"]
