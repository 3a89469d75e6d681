"""No tracebacks for user mistakes: each bad input of issue 17 gets one line and exit code 2.

Cases that change nothing global run in process (typer's CliRunner); the hub cases run as
subprocesses, since vlmft's set-up switches the process to offline mode."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from typer.testing import CliRunner

from vlmft.cli import app

from .conftest import BIN, DEMO, ROOT, clean_env, run

runner = CliRunner()


def one_error(result, exit_code=2) -> str:
    """The single line a mistake gets; asserts the exit code and no traceback."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert code == exit_code, (code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error "), lines
    return lines[0]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_list_index_overrides_work(in_root):
    from vlmft.recipe import load

    r = load(DEMO, ["data.datasets.0.name=first", "data.datasets[0].repeat_time=2"])
    assert (r.data.datasets[0].name, r.data.datasets[0].repeat_time) == ("first", 2.0)
    assert r.data.datasets[0].path == "demo/data/train.jsonl"   # the rest of the item stays


@pytest.mark.parametrize("override, message", [
    ("data.datasets.1.path=x.jsonl", "data.datasets has 1 item(s)"),
    ("data.datasets.first.path=x.jsonl", "data.datasets is a list; address an item by its index"),
    ("data.datasets.0.path=nope.jsonl", "data.datasets[0].path: file 'nope.jsonl' not found"),
    ("data.datasets.0.pth=x.jsonl", "data.datasets[0].pth: unknown key; did you mean 'path'?"),
])
def test_list_index_override_mistakes(in_root, override, message):
    line = one_error(cli("lr-table", DEMO, override))
    assert message in line, line


def test_output_dir_that_cannot_be_created_is_refused_before_anything_loads(in_root, tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_error(cli("train", DEMO, f"output_dir={tmp_path / 'file' / 'run'}"))
    assert line == f"error output_dir: '{tmp_path / 'file' / 'run'}' cannot be created: " \
                   f"'{tmp_path / 'file'}' is a file; choose another output_dir"
    line = one_error(cli("train", DEMO, f"output_dir={tmp_path / 'file'}"))
    assert "exists and is not a folder" in line


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_output_dir_the_file_system_refuses(in_root):
    """Validation asks os.access (root may write anywhere); /proc refuses mkdir even to root."""
    line = one_error(cli("train", DEMO, "output_dir=/proc/vlmft-test/run"))
    assert line.startswith("error output_dir: cannot create '/proc/vlmft-test/run'"), line


def test_readonly_output_dir_is_a_validation_error(tmp_path):
    from vlmft.validation import output_dir_problem

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("running as root: permissions do not stop root")
    assert "no write permission" in output_dir_problem(str(ro / "run"))


def test_another_runs_output_dir_is_refused(in_root, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step4").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    line = one_error(cli("train", DEMO, f"output_dir={out}"))
    assert f"output_dir: '{out}' already holds a run" in line and "step4" in line
    assert "--resume auto" in line and "--overwrite" in line
    line = one_error(cli("train", DEMO, f"output_dir={out}", "--resume", "auto", "--overwrite"))
    assert "give one of them" in line
    assert (out / "metrics.jsonl").is_file()  # nothing touched


@pytest.mark.parametrize("args, message", [
    (["--json", "--csv"], "--json, --csv and --wide choose the output format"),
    (["--wide", "--csv"], "--json, --csv and --wide choose the output format"),
    (["--step", "0"], "--step: steps count from 1"),
    (["--by", "tower"], "--by: 'tower' is not one of param, layer, group"),
])
def test_lr_table_flag_mistakes(in_root, args, message):
    assert message in one_error(cli("lr-table", DEMO, *args))


def test_epochs_and_max_steps_together(in_root):
    line = one_error(cli("lr-table", DEMO, "train.epochs=2"))  # the demo sets max_steps
    assert "train.epochs: set either train.max_steps or train.epochs, not both" in line
    line = one_error(cli("lr-table", DEMO, "train.epochs=2", "~train.max_steps"))
    assert "override must look like key.path=value" in line


@pytest.mark.parametrize("recipe", ["internvl2_5-78b.yaml", "qwen2_5-vl-72b.yaml"])
def test_pack_stats_on_a_config_only_folder_is_one_line(in_root, recipe):
    line = one_error(cli("pack-stats", ROOT / "recipes" / recipe))
    assert "has no processor files" in line and "model.name_or_path" in line


def test_model_folder_without_config_or_processor(in_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in one_error(cli("lr-table", DEMO, f"model.name_or_path={empty}"))
    shutil.copy(ROOT / "demo" / "model" / "config.json", empty / "config.json")
    line = one_error(cli("pack-stats", DEMO, f"model.name_or_path={empty}", "--limit", "2"))
    assert "has no processor files" in line


def test_broken_json_array_dataset(in_root, tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text('[{"conversations": []},\n {"conversations": [}]\n')
    line = one_error(cli("pack-stats", DEMO, "--data", bad))
    assert f"{bad}:2: record 1 is not valid JSON" in line


def test_unknown_recipe_section(in_root):
    assert "did you mean 'optim'?" in one_error(cli("recipe", "optm"))
    assert "give it alone" in one_error(cli("recipe", "optim", "--init"))


def test_version_and_flags_shown_as_flags():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip().startswith("vlmft ")
    helptext = cli("lr-table", "--help").stdout
    assert "--json " in helptext and "<bool>" not in helptext


# ---------------------------------------------------------------- the hub, in subprocesses

def _no_hub(tmp_path, **extra):
    """A process whose hub endpoint refuses connections and whose cache is empty (or given)."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", **extra}
    return clean_env(**env)


def test_hub_id_without_network_fails_fast_in_one_line(tmp_path):
    t = time.perf_counter()
    p = run([str(BIN / "vlmft"), "lr-table", str(DEMO), "model.name_or_path=some-org/some-model"],
            env=_no_hub(tmp_path))
    took = time.perf_counter() - t
    line = one_error(p)
    assert "model.name_or_path: 'some-org/some-model' is not in the local Hugging Face cache" in line
    assert "127.0.0.1 cannot be reached" in line and "hf download some-org/some-model" in line
    assert took < 30, took  # imports and the probe; huggingface_hub alone retries for ~26 s a file


def test_hub_offline_mode_is_honoured_and_named(tmp_path):
    p = run([str(BIN / "vlmft"), "lr-table", str(DEMO), "model.name_or_path=org/x"],
            env=_no_hub(tmp_path, HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set" in one_error(p)


def test_cached_hub_model_loads_offline_when_the_hub_is_unreachable(in_root, tmp_path):
    snap = tmp_path / "hub" / "models--cached--demo" / "snapshots" / "abc"
    shutil.copytree(ROOT / "demo" / "model", snap)
    (tmp_path / "hub" / "models--cached--demo" / "refs").mkdir()
    (tmp_path / "hub" / "models--cached--demo" / "refs" / "main").write_text("abc")
    p = run([str(BIN / "vlmft"), "lr-table", str(DEMO), "model.name_or_path=cached/demo",
             "--json"], env=_no_hub(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "using the cached copy of 'cached/demo' (offline mode)" in p.stderr
    from safetensors.torch import load_file

    weights = load_file(str(ROOT / "demo" / "model" / "model.safetensors"))
    assert json.loads(p.stdout)["totals"]["total"] == sum(w.numel() for w in weights.values())


def test_chat_mistakes_are_one_line(tmp_path):
    """`vlmft chat` on a folder that is not there (a one-word name too: before this check,
    huggingface_hub retried it as a hub id for ~23 s), a hub id without network, an image that
    is not there."""
    for args, message in ((["runs/nope/final", "q"], "folder 'runs/nope/final' not found"),
                          (["nowhere", "q"], "folder 'nowhere' not found"),
                          (["some-org/nowhere", "q"], "'some-org/nowhere' is not in the local Hugging Face cache"),
                          ([str(ROOT / "demo" / "model"), "q", "--image", "nope.png"], "--image: 'nope.png' not found")):
        t = time.perf_counter()
        p = run([str(BIN / "vlmft"), "chat", *args], env=_no_hub(tmp_path))
        assert message in one_error(p) and time.perf_counter() - t < 20, args
