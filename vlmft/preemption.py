"""Stop at a step boundary on SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C): the handler
only sets a flag; train_step sums it over ranks with its step counts (no extra collective), and
every rank saves at the end of that step and exits 0."""

from __future__ import annotations

import signal


class Preemption:
    """SIGTERM and SIGINT set ``flag`` while it is installed; :meth:`restore` puts the previous
    handlers back."""

    def __init__(self):
        self.flag = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handle(self, signum, frame):
        self.flag = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
