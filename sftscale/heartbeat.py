"""Telling a slow run from a stuck one: per-rank heartbeats, `sftscale status`, and collectives
that name who did not arrive.

Every rank writes <run>/heartbeat/rank<r>.json (rank, step, phase, time, pid, host) when it
enters a phase and after every step; a write is a rename, so a reader never sees half a file.

    sftscale status runs/demo/train      # last step, its age, each rank's phase and age

A collective that outlives `scale.collective_timeout_s` raises on the ranks that arrived; the
loop turns that into an error naming the collective, the step and the ranks whose heartbeat
shows they never reached it. A rank that beats no more for `scale.stall_timeout_s` (stuck in
I/O, a deadlock, anything without a deadline of its own) prints where every thread of it is and
exits, so a launcher treats it as a dead worker (Ray restarts the group with
`scale.max_failures`). Under Ray the driver reports a rank that has stopped making progress
(`StallReporter`) long before either deadline.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HEARTBEAT_DIR = "heartbeat"
STALL_EXIT_CODE = 75  # a rank that made no progress for scale.stall_timeout_s


class Heartbeat:
    """This rank's heartbeat file, and (stall_timeout_s > 0) a watchdog that ends the process
    when no beat came for that long: every thread's stack to stderr, then exit 75."""

    def __init__(self, run_dir: Path, *, rank: int, stall_timeout_s: float = 0) -> None:
        self.path = Path(run_dir) / HEARTBEAT_DIR / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.base = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}
        self.stall_timeout_s = stall_timeout_s
        self.last: dict[str, Any] = {"step": 0, "phase": "start", "at": time.monotonic()}
        self._done = threading.Event()
        if stall_timeout_s > 0:
            threading.Thread(
                target=self._watch, name="sftscale-stall-watchdog", daemon=True
            ).start()

    def beat(self, *, step: int, phase: str, **extra: Any) -> None:
        self.last = {"step": step, "phase": phase, "at": time.monotonic()}
        record = {**self.base, "step": step, "phase": phase, "time": time.time(), **extra}
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)
        if phase == "done":
            self._done.set()

    def _watch(self) -> None:
        poll = min(5.0, self.stall_timeout_s / 10)
        while not self._done.wait(poll):
            last = self.last
            idle = time.monotonic() - last["at"]
            if idle <= self.stall_timeout_s:
                continue
            print(
                f"[sftscale] rank {self.base['rank']}: no progress for {idle:.0f} s (phase "
                f"{last['phase']}, {last['step']} steps done), longer than "
                f"scale.stall_timeout_s={self.stall_timeout_s:g}; this rank's threads were at:",
                file=sys.stderr,
                flush=True,
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            print(
                f"[sftscale] rank {self.base['rank']}: exiting with {STALL_EXIT_CODE} so the "
                "launcher restarts the workers (Ray: scale.max_failures) or stops the job",
                file=sys.stderr,
                flush=True,
            )
            os._exit(STALL_EXIT_CODE)


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
    return [
        r
        for r in range(world)
        if r not in seen or seen[r]["step"] < step or _alive(seen[r]) is False
    ]


@contextlib.contextmanager
def awaited(
    what: str, *, run_dir: Path, rank: int, step: int, world: int, timeout_s: int
) -> Iterator[None]:
    """Re-raise a collective's timeout as an error that says what was awaited and who is late."""
    try:
        yield
    except RuntimeError as e:  # gloo: "Timed out waiting ..."; torch.distributed.DistError
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        late = missing_ranks(run_dir, step=step, world=world)
        who = (
            f"rank(s) {', '.join(map(str, late))} did not arrive"
            if late
            else ("every rank's heartbeat reached this step: a rank is stuck inside it")
        )
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
    for b, state in _states(beats, now):
        lines.append(
            f"  rank {b['rank']:>3}  {b['host']}:{b['pid']:<8} {b['phase']:<10} "
            f"step {b['step']:>7}  {now - b['time']:7.0f} s ago  {state}"
        )
    return "\n".join(lines)


NO_PROGRESS = "no progress (stopped or stuck?)"
GONE = "process gone or stopped"


def _states(beats: list[dict[str, Any]], now: float) -> list[tuple[dict[str, Any], str]]:
    """Each rank's state: finished, running, gone or stopped, or no progress for much longer
    than a typical step (max(60 s, 20 steps))."""
    typical = _typical_step_s(beats)
    out = []
    for b in beats:
        alive = _alive(b)
        state = {True: "running", False: GONE, None: "on another host"}[alive]
        if b["phase"] == "done":
            state = "finished"
        elif alive is not False and typical and now - b["time"] > max(60.0, 20 * typical):
            state = NO_PROGRESS
        out.append((b, state))
    return out


class StallReporter:
    """The driver's watch on a run (Ray): says once per rank and step when a rank's process is
    gone or stopped, or its heartbeat has not moved for max(60 s, 20 typical steps)."""

    def __init__(self, run_dir: Path, *, log: Callable[[str], None], every_s: float = 5.0) -> None:
        self.run_dir, self.log, self.every_s = Path(run_dir), log, every_s
        self.reported: set[tuple[int, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="sftscale-stall-reporter", daemon=True
        )

    def __enter__(self) -> StallReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        said = []
        for b, state in _states(read_heartbeats(self.run_dir), now):
            key = (b["rank"], b["step"], b["pid"])
            if state not in (NO_PROGRESS, GONE) or key in self.reported:
                continue
            self.reported.add(key)
            said.append(
                f"rank {b['rank']} ({b['host']}:{b['pid']}), phase {b['phase']} after "
                f"{b['step']} steps, last heartbeat {now - b['time']:.0f} s ago: {state}. The "
                f"other ranks fail after scale.collective_timeout_s, this one after "
                f"scale.stall_timeout_s (`sftscale status {self.run_dir}`)"
            )
        for line in said:
            self.log(line)
        return said

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(OSError):
                self.check()


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
