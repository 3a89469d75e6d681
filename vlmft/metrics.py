"""Metrics: one JSON object per optimizer step in {output_dir}/metrics.jsonl, a rich progress
bar on rank 0 (other ranks stay quiet), TensorBoard when asked."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Metrics:
    def __init__(self, output_dir: str, total_steps: int, start_step: int, rank: int,
                 tensorboard: bool = False, console: Console | None = None):
        self.rank = rank
        self.file = None
        self.progress = None
        self.tb = None
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


# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name; MFU is reported only on these,
# over the model FLOPs of vlmft/mfu.py.
PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362.05e12, "B200": 2250e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
