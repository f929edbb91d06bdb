"""A run directory has one owner at a time, and a history.

    with own_run_dir(run_dir, log=say):      # a second launch fails at once, naming the holder
        ...
    record_history(run_dir, {"event": "resume forced", "changes": [...]})

The owner holds an exclusive flock on <run>/.owner.lock for as long as it runs (the kernel
releases it when the process dies, however it dies) and writes who it is to <run>/.owner. A
lock held by a live process is refused with that process named; an .owner file left by a
process that is gone (a SIGKILL, a node reboot) is taken over with a message.

flock is reliable on local disks and on NFSv4 (Linux maps it to POSIX byte-range locks, which
the server arbitrates across clients). On NFSv3 mounted with `nolock`, on some FUSE filesystems
and on object-storage mounts it locks only within one machine: there, two launches on two
machines into one run directory are not stopped; give each run its own logging.run_name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sftscale.config import ConfigError

LOCK_FILE, OWNER_FILE, HISTORY_FILE = ".owner.lock", ".owner", "history.jsonl"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def own_run_dir(run_dir: Path, *, log: Callable[[str], None]) -> Iterator[None]:
    """Hold `run_dir` for this process, or raise ConfigError naming its holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = run_dir / OWNER_FILE
    with open(run_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir} is in use by {_holder(owner)}: another launch of this run is still "
                f"running. Wait for it, stop it (touch {run_dir / 'STOP'}: it checkpoints and "
                "exits), or choose another logging.run_name"
            ) from None
        try:
            if owner.is_file():  # its writer is gone: the lock was free
                log(f"taking over {run_dir} from {_holder(owner)}, which is no longer running")
            me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
            tmp = owner.with_name(owner.name + ".tmp")
            tmp.write_text(json.dumps(me) + "\n")
            tmp.replace(owner)
            yield
        finally:
            owner.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _holder(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text())
    except (OSError, ValueError):
        return "another process (no .owner record)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    here = info.get("host") == socket.gethostname()
    state = "" if not here else (" (alive)" if _alive(int(info["pid"])) else " (gone)")
    return f"pid {info.get('pid')} on host {info.get('host')}{state}, since {since}"


def record_history(run_dir: Path, event: dict) -> None:
    """Append `event` (with the time) to <run>/history.jsonl, durably."""
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps({"time": time.time(), **event}, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
