"""Stop requests from signals: Ctrl-C, SIGTERM (schedulers) and SLURM's preemption warning."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("segtrain.train")


def preemption_signal() -> signal.Signals:
    """The signal SLURM sends ahead of a preemption or time limit under submitit: USR2, or what
    SUBMITIT_PREEMPT_SIGNAL names (submitit reads the same variable)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


class StopSignals:
    """While installed, records the first stop signal; the loop stops after the iteration it
    arrived in, once the checkpoint is written. A second Ctrl-C stops at once.

    The handlers that were there before are kept: on the preemption signal the previous one
    (submitit's, which requeues the job and exits) runs after the checkpoint, in `hand_over`.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM, preemption_signal()):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: stopping after this iteration", signal.Signals(signum).name)

    def hand_over(self) -> None:
        """After the checkpoint: let the preemption signal's previous Python handler run (it may
        exit; on ranks > 0 submitit's returns)."""
        previous = self._previous.get(self.received)
        if self.received == preemption_signal() and callable(previous):
            log.warning("%s: checkpoint written; handing over to %r",
                        signal.Signals(self.received).name, previous)
            previous(self.received, None)
