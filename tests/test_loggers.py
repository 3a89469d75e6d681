"""Weights & Biases in offline mode (no network: the run file it writes, read back here record
by record) carries what metrics.jsonl holds; `vlmft plot` writes a valid PNG of the curves."""

from __future__ import annotations

import json
import struct
import time

from typer.testing import CliRunner

from vlmft.cli import app
from vlmft.recipe import load

from .conftest import DEMO


def wandb_history(run_file) -> list[dict]:
    """The history records of a .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks
    of records: crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif rec.WhichOneof("record_type") == "run":
                out.append({"_project": rec.run.project, "_name": rec.run.display_name})
            elif rec.WhichOneof("record_type") == "exit":
                out.append({"_exit": True})
    return out


def test_wandb_offline_logs_every_metric_and_plot_draws_them(tmp_path, in_root, dist_env, monkeypatch):
    from vlmft.train import train

    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(load(DEMO, [f"output_dir={out}", "train.max_steps=4", "eval.every_steps=2", "log.wandb=true",
                      "log.wandb_mode=offline", "log.wandb_project=tests", "log.wandb_run_name=wb"]))
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    run_id = (out / "wandb" / "run_id").read_text()
    history = []
    for _ in range(200):                      # wandb's own process may still be writing it
        found = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
        history = wandb_history(found[0]) if found else []
        if history and history[-1].get("_exit"):
            break
        time.sleep(0.1)
    assert {"_project": "tests", "_name": "wb"} in history
    history = [h for h in history if "_step" in h]
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    for h in history:
        row = rows[h["_step"]]
        assert h["loss"] == row["loss"] and h["lr"] == row["lr"] and h["train/train/loss"] == row["train/train/loss"]
        assert all(h[f"lr_groups/{k}"] == v for k, v in row["lr_groups"].items())
        if h["_step"] % 2 == 0:
            assert h["eval/heldout/loss"] == row["eval/heldout/loss"]
            assert h["eval/heldout/visual_gap"] == row["eval/heldout/visual_gap"]
        else:
            assert "eval/heldout/loss" not in h

    from PIL import Image

    result = CliRunner().invoke(app, ["plot", str(out)])
    assert result.exit_code == 0, result.output
    png = out / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1200, 800)
        im.verify()
    with Image.open(png) as im:   # not blank: the curves are drawn
        assert len(im.convert("L").getcolors(256) or []) > 20
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output


def test_log_wandb_without_the_package_is_one_line(monkeypatch, in_root):
    import importlib.util

    import pytest

    from vlmft.recipe import RecipeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError) as e:
        load(DEMO, ["log.wandb=true"])
    assert e.value.errors == ["log.wandb: the wandb package is not installed; pip install 'vlmft[wandb]' "
                              "or set log.wandb=false"]
