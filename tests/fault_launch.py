"""``vlmft`` with a fault injected: the process kills itself inside the checkpoint save of step
STEP, after every rank wrote its shards and before the COMPLETE marker (the crash-safety test).

    torchrun ... tests/fault_launch.py STEP train recipe.yaml [overrides ...]
"""

from __future__ import annotations

import os
import signal
import sys

from vlmft import checkpoint
from vlmft.cli import main

STEP = int(sys.argv.pop(1))
_mark_complete = checkpoint.mark_complete


def dying_mark_complete(ckpt_dir, tag, extra, keep_last):
    if tag == f"step{STEP}":
        os.kill(os.getpid(), signal.SIGKILL)
    _mark_complete(ckpt_dir, tag, extra, keep_last)


checkpoint.mark_complete = dying_mark_complete
sys.argv[0] = "vlmft"
main()
