"""Rank-0 metrics sink: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes() -> int:
    """Device memory high-water mark on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def say(message: str) -> None:
    """Progress line on stdout. Not `print`: Ray Train patches print and, with Ray's wrapped
    stdout, every printed line would show twice in the driver's log."""
    sys.stdout.write(f"[sftscale] {message}\n")
    sys.stdout.flush()


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A run starts from step 0, so its metrics file starts empty (line-buffered).
        self._file = open(run_dir / "metrics.jsonl", "w", buffering=1)  # noqa: SIM115 (closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
