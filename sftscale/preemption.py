"""A request to checkpoint and stop at the next step boundary: SIGTERM, or a STOP file.

touch <run>/STOP        # checkpoint at the next step and stop (SLURM's trap uses it)
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

STOP_FILE = "STOP"


class PreemptionFlag:
    """SIGTERM, or the run directory's STOP file (polled by rank 0). Every rank learns of it
    through an all-reduce at the end of the step running then. Signal handlers can only be
    installed from the main thread; Ray Train runs the loop in another thread, so there the
    STOP file is the way in (launchers/slurm uses it)."""

    def __init__(self, *, stop_file: Path | None) -> None:
        self._signalled = False
        self._stop_file = stop_file
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def requested(self) -> bool:
        return self._signalled or (self._stop_file is not None and self._stop_file.exists())

    def served(self) -> None:
        """The request is served (a checkpoint is saved): a rerun resumes instead of stopping."""
        if self._stop_file is not None:
            self._stop_file.unlink(missing_ok=True)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
