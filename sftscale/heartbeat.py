"""Telling a slow run from a stuck one: per-rank heartbeats, `sftscale status`, and collectives
that name who did not arrive.

Every rank writes <run>/heartbeat/rank<r>.json (rank, step, phase, time, pid, host) when it
enters a phase and after every step; a write is a rename, so a reader never sees half a file.

    sftscale status runs/demo/train      # last step, its age, each rank's phase and age

A collective that outlives `scale.collective_timeout_s` raises on the ranks that arrived; the
loop turns that into an error naming the collective, the step and the ranks whose heartbeat
shows they never reached it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEARTBEAT_DIR = "heartbeat"


class Heartbeat:
    def __init__(self, run_dir: Path, *, rank: int) -> None:
        self.path = Path(run_dir) / HEARTBEAT_DIR / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.base = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}

    def beat(self, *, step: int, phase: str, **extra: Any) -> None:
        record = {**self.base, "step": step, "phase": phase, "time": time.time(), **extra}
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)


def read_heartbeats(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(Path(run_dir, HEARTBEAT_DIR).glob("rank*.json")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            out.append(json.loads(f.read_text()))
    return sorted(out, key=lambda r: r["rank"])


def missing_ranks(run_dir: Path, *, step: int, world: int) -> list[int]:
    """Ranks that cannot be at the collectives of the step after `step` done steps: no
    heartbeat, a heartbeat from before that step began, or (on this host) a process that is
    gone or stopped."""
    seen = {r["rank"]: r for r in read_heartbeats(run_dir)}
    return [r for r in range(world)
            if r not in seen or seen[r]["step"] < step or _alive(seen[r]) is False]  # fmt: skip


@contextlib.contextmanager
def awaited(what: str, *, run_dir: Path, rank: int, step: int, world: int,
            timeout_s: int) -> Iterator[None]:  # fmt: skip
    """Re-raise a collective's timeout as an error that says what was awaited and who is late."""
    try:
        yield
    except RuntimeError as e:  # gloo: "Timed out waiting ..."; torch.distributed.DistError
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        late = missing_ranks(run_dir, step=step, world=world)
        who = f"rank(s) {', '.join(map(str, late))} did not arrive" if late else (
            "every rank's heartbeat reached this step: a rank is stuck inside it")  # fmt: skip
        raise TimeoutError(
            f"rank {rank}, step {step + 1}: {what} did not complete within "
            f"scale.collective_timeout_s={timeout_s} s; {who} (`sftscale status {run_dir}`). "
            f"Cause: {str(e).splitlines()[0]}"
        ) from e


def status(run_dir: Path, *, now: float | None = None) -> str:
    """What `sftscale status RUN` prints."""
    now = time.time() if now is None else now
    beats = read_heartbeats(run_dir)
    if not beats:
        return (
            f"{run_dir}: no heartbeat yet (no worker has started, or not a sftscale run directory)"
        )
    step = min(b["step"] for b in beats)
    newest = max(b["time"] for b in beats)
    lines = [f"{run_dir}: step {step} (slowest rank), last heartbeat {now - newest:.0f} s ago"]
    typical = _typical_step_s(beats)
    for b in beats:
        age = now - b["time"]
        alive = _alive(b)
        state = {True: "running", False: "process gone or stopped", None: "on another host"}[alive]
        if b["phase"] == "done":
            state = "finished"
        elif alive is not False and typical and age > max(60.0, 20 * typical):
            state = "no progress (stopped or stuck?)"
        lines.append(f"  rank {b['rank']:>3}  {b['host']}:{b['pid']:<8} {b['phase']:<10} "
                     f"step {b['step']:>7}  {age:7.0f} s ago  {state}")  # fmt: skip
    return "\n".join(lines)


def _typical_step_s(beats: list[dict[str, Any]]) -> float | None:
    times = [b["step_time_s"] for b in beats if b.get("step_time_s")]
    return statistics.median(times) if times else None


def _alive(beat: dict[str, Any]) -> bool | None:
    """Is the rank's process running (not gone, not a zombie, not stopped)? None on another host."""
    if beat["host"] != socket.gethostname():
        return None
    try:
        stat = Path(f"/proc/{beat['pid']}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]  # the field after the command name
    return state not in ("T", "t", "Z", "X")
