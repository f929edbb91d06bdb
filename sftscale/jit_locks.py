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
import shutil
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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
    # heavy (torch): loaded only on the path that uses it
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


# The ops DeepSpeed can JIT-build for a run. The default path needs none of them: torch's AdamW
# steps the optimizer (optim.kernel=auto) and gloo carries every collective (the CPU
# accelerator's shared-memory op serves only inference all-reduce; sftscale.engine skips it).
RUN_OPS = ("CPUAdamBuilder", "AsyncIOBuilder", "FusedAdamBuilder", "ShareMemCommBuilder")
OFFLOAD_OPS = ("CPUAdamBuilder", "AsyncIOBuilder")  # what the shipped offload templates load
SHORT_NAMES = {
    "cpu_adam": "CPUAdamBuilder",
    "async_io": "AsyncIOBuilder",
    "fused_adam": "FusedAdamBuilder",
    "shm_comm": "ShareMemCommBuilder",
}
OP_NAMES = {
    "CPUAdamBuilder": "CPU Adam",
    "AsyncIOBuilder": "async I/O",
    "FusedAdamBuilder": "fused Adam",
    "ShareMemCommBuilder": "shared-memory comm",
}


def op_builder_name(name: str) -> str:
    """cpu_adam -> CPUAdamBuilder; a builder's own name is accepted as is."""
    if name in RUN_OPS:
        return name
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    raise ValueError(f"no op {name!r}: choose from {', '.join(SHORT_NAMES)}")


def required_ops(ds_config: dict[str, Any], template: str) -> list[tuple[str, str]]:
    """(op builder, why) for every JIT op a run with this resolved DeepSpeed config loads."""
    zero = ds_config.get("zero_optimization", {})
    opt_at = zero.get("offload_optimizer", {}).get("device")
    par_at = zero.get("offload_param", {}).get("device")
    optimizer = ds_config.get("optimizer", {})
    adam = str(optimizer.get("type", "")).lower() in ("adam", "adamw")
    ops = []
    if adam and optimizer.get("params", {}).get("torch_adam") is not True:
        if opt_at in ("cpu", "nvme"):
            ops.append(
                (
                    "CPUAdamBuilder",
                    f"deepspeed.template={template} steps the optimizer "
                    f"on the host ({opt_at}) with DeepSpeed's CPU Adam",
                )
            )
        else:
            ops.append(("FusedAdamBuilder", "optim.kernel=deepspeed"))
    if "nvme" in (opt_at, par_at):
        ops.append(("AsyncIOBuilder", f"deepspeed.template={template} swaps to NVMe"))
    return ops


def is_built(name: str) -> bool:
    """Whether op `name`'s library is already in the extensions directory (a load, no build)."""
    # heavy (deepspeed): loaded only on the path that uses it
    from deepspeed.accelerator import get_accelerator

    op = get_accelerator().create_op_builder(name).name
    return (extensions_root() / op / f"{op}.so").is_file()


def missing_build_tools(name: str) -> str | None:
    """What this machine lacks to build op `name`, as the package to install; None: nothing."""

    if not (shutil.which("c++") or shutil.which("g++")):
        return "a C++ compiler: apt-get install g++ (Debian, Ubuntu) or dnf install gcc-c++"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "the Python headers: apt-get install python3-dev or dnf install python3-devel"
    if not op_available(name):
        if name == "AsyncIOBuilder":
            return "libaio: apt-get install libaio-dev (Debian, Ubuntu) or dnf install libaio-devel"
        return f"what DeepSpeed's {name} needs (run `ds_report` for the reason)"
    return None


class OpBuildError(RuntimeError):
    pass


def ensure_ops(ops: list[tuple[str, str]], *, log: Callable[[str], None]) -> None:
    """Build (first use) or load each op in `ops` now, in the driver, before any worker starts:
    a line saying which op is built and why, and its time when done. Raises OpBuildError naming
    what to install when this machine cannot build one."""
    if not ops:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    use_environment_ninja()
    locks = BuildLockWatch(extensions_root(), log=log)
    for name, why in ops:
        missing = missing_build_tools(name)
        if missing:
            raise OpBuildError(
                f"DeepSpeed's {OP_NAMES.get(name, name)} op ({why}) cannot be built on this "
                f"machine: install {missing}; or choose a template without it"
            )
        built = is_built(name)
        if not built:
            log(
                f"building DeepSpeed's {OP_NAMES.get(name, name)} op ({why}) into "
                f"{extensions_root()}: first use only, a minute or more"
            )
        locks.scan()  # a lock a killed build left is removed, a live one is said
        t0 = time.perf_counter()
        _load(name, why)
        if not built:
            log(f"{OP_NAMES.get(name, name)} op built in {time.perf_counter() - t0:.0f} s")


def _cuda() -> bool:
    # heavy (torch): loaded only on the path that uses it
    import torch

    return torch.cuda.is_available()


def _load(name: str, why: str) -> None:
    # heavy (deepspeed): loaded only on the path that uses it
    from deepspeed.accelerator import get_accelerator

    try:
        get_accelerator().create_op_builder(name).load(verbose=False)
    except Exception as e:  # a compiler error: say which op, why it was wanted, the first line
        first = (str(e) or type(e).__name__).splitlines()[0]
        raise OpBuildError(
            f"DeepSpeed's {OP_NAMES.get(name, name)} op ({why}) failed to build: {first}"
        ) from e


def op_available(name: str) -> bool:
    """Whether this machine can build DeepSpeed's op `name` for its accelerator (e.g. the async
    I/O op needs libaio)."""
    # heavy (deepspeed): loaded only on the path that uses it
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    return builder is not None and builder.is_compatible(verbose=False)


def prebuild_ops(*, log: Callable[[str], None], names: tuple[str, ...] = RUN_OPS) -> int:
    """`sftscale build-ops`: build (or load) DeepSpeed's JIT ops into the extensions directory
    ahead of time (cluster images), so that no run compiles or meets a build lock. Returns how
    many ops could not be built although this machine supports them (0: all good)."""
    # heavy (deepspeed): loaded only on the path that uses it
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
        locks.scan()
        t0 = time.perf_counter()
        try:
            _load(name, "sftscale build-ops")
        except OpBuildError as e:  # say it, build the rest
            failed += 1
            log(f"{name}: {e}")
            continue
        log(f"{name}: ready in {extensions_root()} ({time.perf_counter() - t0:.1f} s)")
    return failed
