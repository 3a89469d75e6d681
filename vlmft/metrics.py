"""Metrics: one JSON object per optimizer step in {output_dir}/metrics.jsonl, a rich progress
bar on rank 0 (other ranks stay quiet), TensorBoard and Weights & Biases when asked.

W&B (``log.wandb``, the optional extra ``vlmft[wandb]``) gets every number of a row at its step
(dicts as ``key/sub``); its files go to {output_dir}/wandb, and the run's id is kept there so a
resumed training run continues the same W&B run. ``log.wandb_mode: offline`` needs no network
(``wandb sync`` uploads later)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Metrics:
    def __init__(self, output_dir: str, total_steps: int, start_step: int, rank: int,
                 tensorboard: bool = False, console: Console | None = None, wandb: dict | None = None):
        self.rank = rank
        self.file = None
        self.progress = None
        self.tb = None
        self.wandb = None
        if rank != 0:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        kept = []
        if start_step and path.is_file():  # resumed: drop steps logged after the checkpoint
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.file = open(path, "w", encoding="utf-8")
        self.file.write("".join(line + "\n" for line in kept))
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           loss=float("nan"), lr=0.0, tps=0.0)
        self.progress.start()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(out / "tb"))
        if wandb is not None:
            self.wandb = _wandb_run(wandb, resumed=bool(start_step))
        self._t = time.perf_counter()

    def log(self, row: dict) -> None:
        if self.rank != 0:
            return
        # strict JSON: a skipped step's loss is null, not NaN
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        self.progress.update(self.task, completed=row["step"], loss=row.get("loss", float("nan")),
                             lr=row.get("lr", 0.0), tps=row.get("tokens_per_s", 0.0))
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
                elif isinstance(v, dict):
                    self.tb.add_scalars(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(_numbers(clean), step=row["step"])

    def print(self, msg: str) -> None:
        if self.rank == 0:
            self.console.print(msg, soft_wrap=True, highlight=False)

    def close(self) -> None:
        if self.rank != 0:
            return
        self.progress.stop()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_settings(log, out: Path, config: dict) -> dict | None:
    """``wandb.init`` arguments from the recipe's ``log`` section (None when log.wandb is off)."""
    if not log.wandb:
        return None
    return {"project": log.wandb_project, "name": log.wandb_run_name or Path(out).resolve().name,
            "mode": log.wandb_mode, "dir": str(out), "config": config}


def _wandb_run(settings: dict, resumed: bool):
    """Start (or, for a resumed run, continue) the W&B run; its id lives in dir/wandb/run_id."""
    try:
        import wandb
    except ImportError:
        raise ValueError("log.wandb: the wandb package is not installed; pip install 'vlmft[wandb]' "
                         "or set log.wandb=false") from None
    folder = Path(settings["dir"]) / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else _new_id()
    id_file.write_text(run_id)
    return wandb.init(id=run_id, resume="allow", **settings)


def _new_id() -> str:
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _numbers(row: dict, prefix: str = "") -> dict:
    """The row's numbers (nested dicts flattened as key/sub; lists and None left out)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[prefix + k] = v
    return out


# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name; MFU is reported only on these,
# over the model FLOPs of vlmft/mfu.py.
PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362.05e12, "B200": 2250e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
