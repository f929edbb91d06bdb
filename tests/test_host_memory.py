"""CPU workers pin glibc's mmap threshold (train.cpu_mmap_threshold), so what ZeRO-3 gathers
and frees goes back to the system and a rank's RSS follows its live tensors, as sftscale plan
counts it (benchmarks/results/plan_validation.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sftscale.config import load_config

# In a fresh process: free an 8 MiB block (glibc's dynamic threshold then rises to 8 MiB), then
# allocate 4 MiB and print whether it got a mapping of its own (mallinfo2's hblkhd).
PROBE = """
import ctypes, sys
from sftscale.devices import pin_mmap_threshold
libc = ctypes.CDLL(None)
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MI2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
print(pin_mmap_threshold(int(sys.argv[1])))
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblkhd
p = libc.malloc(4 << 20)
print(libc.mallinfo2().hblkhd - before >= 4 << 20)
libc.free(p)
"""


def _probe(threshold: int) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pinned_threshold_maps_what_glibc_would_keep_in_its_heap():
    assert _probe(1 << 20) == ["True", "True"]  # pinned: the 4 MiB block is mapped
    assert _probe(0) == ["False", "False"]  # dynamic: the threshold rose, it is in the heap


def test_cpu_workers_pin_it_before_anything_is_allocated(monkeypatch, tmp_path):
    """train_worker pins the configured threshold first thing on a host without CUDA."""
    import sftscale.train as train  # the worker's module: heavy, this test only

    class Pinned(Exception):
        pass

    def pin(nbytes):
        raise Pinned(nbytes)

    monkeypatch.setattr(train, "pin_mmap_threshold", pin)
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["data.path=x", "train.cpu_mmap_threshold=2097152"])
    with pytest.raises(Pinned) as pinned:
        train.train_worker(cfg, str(tmp_path / "run"))
    assert pinned.value.args == (2 << 20,)
