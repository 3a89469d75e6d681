"""Shared fixtures. Subprocesses run with the rendezvous variables stripped, so a test process
that joined a process group (in-process training) never leaks its RANK/MASTER_PORT into them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
BIN = Path(sys.executable).parent
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra)
    return env


def run(args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; capture text output. On timeout the whole
    process group (torchrun and its workers) is killed, so a hang fails the test, not CI."""
    p = subprocess.Popen(args, cwd=ROOT, env=env or clean_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(args)}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def vlmft(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run([str(BIN / "vlmft"), *args], timeout=timeout)


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` picks a free rendezvous port (``--master_port 0`` hangs)."""
    return run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
                "-m", "vlmft", *args], timeout=timeout)


@pytest.fixture(scope="session")
def processor():
    from vlmft.model import load_processor
    from vlmft.recipe import ModelConfig

    return load_processor(ModelConfig(name_or_path=str(ROOT / "demo" / "model")))


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """The demo trained as `make demo` trains it (recipes/demo.yaml as shipped), once per session:
    the README's evaluation block and its inference lines are run on it."""
    out = tmp_path_factory.mktemp("trained-demo") / "demo"
    p = vlmft("train", str(DEMO), f"output_dir={out}", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.fixture
def dist_env():
    """The CLI's set-up call, for tests that run ``vlmft.train.train`` in this process."""
    from vlmft.distributed import setup_environment

    setup_environment()


@pytest.fixture
def in_root(monkeypatch):
    """Recipes name paths relative to the repository root."""
    monkeypatch.chdir(ROOT)
    return ROOT


def pytest_configure(config):
    """``VLMFT_MUTANT=NAME``: run the session with a deliberate bug (tests/mutants.py)."""
    name = os.environ.get("VLMFT_MUTANT")
    if name:
        from .mutants import apply

        apply(name)


def noise_only(name: str) -> bool:
    """Parameters whose true gradient is exactly 0, so that what they become is rounding noise
    scaled up by Adam to full steps: the key biases of an attention without rotary positions
    (softmax ignores a shift shared by every key), here the demo's CLIP tower. Two runs that
    reduce in another order (another world size) end with unrelated values there, which the
    model's outputs never see; weight comparisons leave them out and check they stay ~0."""
    return name.endswith("self_attn.k_proj.bias") and "vision_tower." in name


def assert_noise_only_stays_tiny(weights: dict) -> None:
    tiny = {k: float(v.norm()) for k, v in weights.items() if noise_only(k)}
    assert all(v < 1e-3 for v in tiny.values()), tiny
