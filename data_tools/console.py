"""What the command-line tools print: prefixed status lines and a progress bar.

Used by `sftscale prepare` (here) and by training and `sftscale bench` (sftscale imports it), so
every tool prints the same way. Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def say(message: str, *, prefix: str = "sftscale") -> None:
    """A status line on stdout. Not `print`: Ray Train patches print and, with Ray's wrapped
    stdout, every printed line would show twice in the driver's log."""
    sys.stdout.write(f"[{prefix}] {message}\n")
    sys.stdout.flush()


class ProgressBar:
    """tqdm on stderr when it is a terminal, else nothing (the status lines serve there: Ray
    worker output is not a terminal and carriage returns would garble its log). With `rate`,
    the postfix also shows that counter per second (e.g. tokens/s)."""

    def __init__(
        self,
        *,
        desc: str,
        unit: str,
        enabled: bool,
        total: int | None = None,
        rate: str | None = None,
    ) -> None:
        self._bar = None
        self._rate, self._count, self._t0 = rate, 0, time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, *, counted: int = 0, **postfix: Any) -> None:
        """Advance by `n` units; `counted` adds to the rate's counter."""
        self._count += counted
        if self._bar is None:
            return
        if self._rate is not None:
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            postfix[f"{self._rate}_per_s"] = f"{self._count / elapsed:,.0f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        if n:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
