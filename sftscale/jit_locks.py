"""No run waits silently on a JIT build lock.

DeepSpeed builds its ops (the CPU accelerator's comm op, fused/CPU Adam) with torch's
cpp_extension, which guards each op's build directory with a `lock` file (FileBaton): the first
process creates it, builds or loads the op and deletes it; every other process polls until the
file is gone. A process killed while holding it (a timeout, an OOM kill, a preemption) leaves the
file behind, and every later run on that machine waits forever, with no output and 0% CPU.

`watch_build_locks()` runs while a worker sets up: it says which lock is held and since when, and
removes a lock that no process can still be serving: older than `stale_after_s` and no process
working in its directory (a build runs ninja and the compiler there, so a live build always has
a process in it; the lock's creator holds it without one only for the instant before it starts
them or after it loaded a built op, both far shorter than `stale_after_s`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def use_environment_ninja() -> None:
    """Build with the ninja of this Python environment (the `ninja` wheel DeepSpeed depends on),
    whatever PATH says. Two ninja versions hash a build command differently (1.11 and 1.13 do),
    so a run whose PATH found the other one rebuilt every op (minutes) although nothing changed."""
    bindir = Path(sys.executable).parent
    if (bindir / "ninja").is_file() and not os.environ.get("PATH", "").startswith(
        f"{bindir}{os.pathsep}"
    ):
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


def extensions_root() -> Path:
    """Where torch builds JIT extensions: TORCH_EXTENSIONS_DIR, else torch's default."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory or an open file is inside `directory` (Linux)."""
    prefix = str(directory.resolve()) + os.sep
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            links = [entry / "cwd", *(entry / "fd").iterdir()]
            if any((os.readlink(link) + os.sep).startswith(prefix) for link in links):
                found.append(int(entry.name))
    return found


class BuildLockWatch:
    """Scans `root/*/lock`; reports held locks once they are `notify_after_s` old and removes
    stale ones (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        log: Callable[[str], None],
        notify_after_s: float = 10.0,
        stale_after_s: float = 60.0,
    ) -> None:
        self.root, self.log = root, log
        self.notify_after_s, self.stale_after_s = notify_after_s, stale_after_s
        self._reported: set[tuple[Path, float]] = set()

    def scan(self) -> list[Path]:
        """One pass; returns the locks it removed."""
        removed = []
        for lock in sorted(self.root.glob("*/lock")):
            try:
                mtime = lock.stat().st_mtime
            except FileNotFoundError:  # released while we looked
                continue
            age = time.time() - mtime
            if age < self.notify_after_s:
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime))
            holders = processes_in(lock.parent)
            if not holders and age >= self.stale_after_s:
                lock.unlink(missing_ok=True)
                removed.append(lock)
                self.log(
                    f"removed a stale JIT build lock {lock} (there since {since}, {age:.0f} s; "
                    "no process is building in its directory: a killed run left it)"
                )
            elif (lock, mtime) not in self._reported:
                self._reported.add((lock, mtime))
                who = (
                    f"pid(s) {', '.join(map(str, holders))} working there"
                    if holders
                    else (
                        f"no process working there yet; removed if none starts within "
                        f"{self.stale_after_s - age:.0f} s"
                    )
                )
                self.log(f"waiting on the JIT build lock {lock}, held since {since} ({who})")
        return removed


@contextlib.contextmanager
def watch_build_locks(
    *, log: Callable[[str], None], poll_s: float = 5.0, root: Path | None = None, **limits: float
) -> Iterator[BuildLockWatch]:
    """Scan now, then every `poll_s` seconds in a daemon thread until the block ends."""
    watch = BuildLockWatch(root or extensions_root(), log=log, **limits)
    watch.scan()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(poll_s):
            watch.scan()

    thread = threading.Thread(target=loop, name="sftscale-build-locks", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(timeout=poll_s)


# The ops a run loads: the optimizer (fused Adam; CPU Adam with offload), the CPU accelerator's
# shared-memory all-reduce, and the async-I/O op of NVMe offload (needs libaio).
RUN_OPS = ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder", "AsyncIOBuilder")


def op_available(name: str) -> bool:
    """Whether this machine can build DeepSpeed's op `name` for its accelerator (e.g. the async
    I/O op needs libaio)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    return builder is not None and builder.is_compatible(verbose=False)


def prebuild_ops(*, log: Callable[[str], None], names: tuple[str, ...] = RUN_OPS) -> int:
    """Build (or load) DeepSpeed's JIT ops into the extensions directory now, as DeepSpeed
    recommends for clusters, so that no run compiles or meets a build lock. Returns how many
    ops could not be built although this machine supports them (0: all good)."""
    from deepspeed.accelerator import get_accelerator

    use_environment_ninja()
    failed = 0
    locks = BuildLockWatch(extensions_root(), log=log)
    for name in names:
        if not op_available(name):
            log(
                f"{name}: not available on this machine ({get_accelerator().device_name()}); "
                "skipped (a run that needs it says what to install)"
            )
            continue
        # Once per op, no thread: a lock a killed build left is removed, a live one is said;
        # the build below holds its own lock while it works.
        locks.scan()
        t0 = time.perf_counter()
        try:
            get_accelerator().create_op_builder(name).load(verbose=False)
        except Exception as e:  # a compiler error: say it, build the rest
            failed += 1
            log(f"{name}: build failed: {(str(e) or type(e).__name__).splitlines()[0]}")
            continue
        log(f"{name}: ready in {extensions_root()} ({time.perf_counter() - t0:.1f} s)")
    return failed
