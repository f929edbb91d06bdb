"""A CPU host's runtime memory (sftscale.runtime_probe): measured once per host and software
by training a tiny model, cached, and what every CPU plan counts besides its tensors."""

from __future__ import annotations

import json

import pytest

from sftscale import runtime_probe
from sftscale.devices import (
    CPU_DOC_KERNEL_BYTES,
    CPU_LENGTH_KERNEL_BYTES,
    CPU_RUNTIME_BYTES,
    GIB,
    host_device,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTSCALE_CACHE", str(tmp_path))
    return tmp_path / "runtime"


def test_the_runtime_is_measured_once_and_planned_with(cache, monkeypatch, capsys):
    """The first plan on a host measures (a tiny model trained for 3 steps in a process of its
    own: its peak RSS minus the tensors its plan counts); later plans read the cache."""
    device = host_device(2, 16 * GIB)
    assert "measuring this host's runtime memory" in capsys.readouterr().out
    [path] = cache.glob("cpu-*.json")
    saved = json.loads(path.read_text())
    assert 0 < saved["tensor_bytes"] < saved["peak_rss_bytes"]
    assert saved["runtime_bytes"] == saved["peak_rss_bytes"] - saved["tensor_bytes"]
    # at least the interpreter with torch, DeepSpeed and transformers loaded
    assert 0.2 * GIB < saved["runtime_bytes"] < 2 * GIB
    assert (device.runtime_bytes, device.runtime_source) == (
        saved["runtime_bytes"],
        "measured here",
    )
    # and what a further micro-batch length keeps: the kernels made for its shapes in bf16
    # (12-15 MiB on an AMX host); fp32 (what `auto` picks under AVX2) keeps none, and what is
    # measured there is the heap's noise (0-0.8 MiB in five runs on one host)
    assert device.length_kernel_bytes == saved["length_kernel_bytes"]
    if _probe_precision() == "bf16":
        assert 4 << 20 < saved["length_kernel_bytes"] < 0.2 * GIB
    else:
        assert 0 <= saved["length_kernel_bytes"] < 4 << 20
    assert device.doc_kernel_bytes == saved["doc_kernel_bytes"] < 0.1 * GIB

    def fail():
        raise AssertionError("measured again")

    monkeypatch.setattr(runtime_probe, "measure", fail)
    assert host_device(4, 16 * GIB).runtime_bytes == saved["runtime_bytes"]
    # other software (here: another torch) is another host as far as the runtime goes
    real = runtime_probe.metadata.version
    monkeypatch.setattr(
        runtime_probe.metadata, "version", lambda d: "0.0" if d == "torch" else real(d)
    )
    assert runtime_probe.cache_path() != path


def _probe_precision() -> str:
    """The precision the probe's lengths step trains in: `auto` on this host."""
    from sftscale.precision import choose, device_native_bf16

    native, why = device_native_bf16(cuda=False)
    return choose("auto", native_bf16=native, why=why).name


def test_a_failed_measurement_is_said_and_planned_with_the_ceiling(cache, monkeypatch, capsys):
    def broken():
        raise runtime_probe.ProbeError("measuring this host's runtime memory failed (train): x")

    monkeypatch.setattr(runtime_probe, "measure", broken)
    device = host_device(2, 16 * GIB)
    assert (device.runtime_bytes, device.runtime_source) == (CPU_RUNTIME_BYTES, "assumed")
    assert device.length_kernel_bytes == CPU_LENGTH_KERNEL_BYTES
    assert device.doc_kernel_bytes == CPU_DOC_KERNEL_BYTES
    out = capsys.readouterr().out
    assert "failed (train): x" in out and "assumed runtime of 0.86 GiB" in out
    assert not list(cache.glob("cpu-*.json"))  # nothing cached: the next plan tries again


def _fake(runtime: int):
    def measure():
        return {
            "peak_rss_bytes": runtime + 1000,
            "tensor_bytes": 1000,
            "runtime_bytes": runtime,
            "length_kernel_bytes": 1 << 20,
            "doc_kernel_bytes": 1 << 19,
        }

    return measure


@pytest.mark.parametrize(
    "content",
    [
        "not json {",
        "[1, 2]",
        '{"runtime_bytes": "__import__(\'os\')"}',
        '{"runtime_bytes": true, "key": "KEY"}',
        '{"runtime_bytes": -5, "key": "KEY"}',
        '{"runtime_bytes": 1e30, "key": "KEY"}',
        '{"runtime_bytes": 123456789, "key": "another-host"}',
        '{"runtime_bytes": 123456789}',
        '{"runtime_bytes": 123456789, "key": "KEY"}',
        '{"runtime_bytes": 123456789, "length_kernel_bytes": -1, "key": "KEY"}',
        b"\xff\xfe\x00binary",
    ],
)
def test_a_cache_file_this_code_did_not_write_is_measured_over(cache, monkeypatch, content):
    """Hostile or broken: never trusted, never evaluated; measured again and replaced."""
    path = runtime_probe.cache_path()
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("KEY", path.stem))
    monkeypatch.setattr(runtime_probe, "measure", _fake(300 << 20))
    assert host_device(2, 16 * GIB).runtime_bytes == 300 << 20
    assert json.loads(path.read_text())["runtime_bytes"] == 300 << 20
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.stem + ".lock"])


def test_a_symlinked_cache_file_is_not_read_and_its_target_not_written(
    cache, tmp_path, monkeypatch
):
    path = runtime_probe.cache_path()
    path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"runtime_bytes": 1, "key": path.stem}))
    path.symlink_to(target)
    monkeypatch.setattr(runtime_probe, "measure", _fake(300 << 20))
    assert host_device(2, 16 * GIB).runtime_bytes == 300 << 20
    assert not path.is_symlink()
    assert json.loads(target.read_text())["runtime_bytes"] == 1  # untouched


def test_a_second_planner_waits_for_the_first_measurement_then_reads_it(cache, monkeypatch):
    """Two launches at once measure once: the second waits on the lock and reads the cache;
    when the first takes longer than WAIT_S, the second plans with the fallback, saying why."""
    import threading

    from sftscale.storage.cache import locked

    path = runtime_probe.cache_path()
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(runtime_probe, "measure", _fake(1))  # would be wrong: must not run
    holder = locked(path.with_suffix(".lock"))
    holder.__enter__()

    def first_finishes():
        path.write_text(
            json.dumps(
                {
                    "runtime_bytes": 400 << 20,
                    "length_kernel_bytes": 0,
                    "doc_kernel_bytes": 0,
                    "key": path.stem,
                }
            )
        )
        holder.__exit__(None, None, None)

    timer = threading.Timer(0.5, first_finishes)
    timer.start()
    assert runtime_probe.cpu_runtime_bytes() == 400 << 20
    timer.join()

    path.unlink()
    monkeypatch.setattr(runtime_probe, "WAIT_S", 0.3)
    with locked(path.with_suffix(".lock")):
        device = host_device(2, 16 * GIB)
    assert (device.runtime_bytes, device.runtime_source) == (CPU_RUNTIME_BYTES, "assumed")


def test_an_unusable_cache_directory_plans_with_the_fallback(cache, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SFTSCALE_CACHE", str(blocker))  # not a directory: nothing can go in it
    monkeypatch.setattr(runtime_probe, "measure", _fake(1))
    device = host_device(2, 16 * GIB)
    assert (device.runtime_bytes, device.runtime_source) == (CPU_RUNTIME_BYTES, "assumed")
    assert "set SFTSCALE_CACHE to a writable directory" in capsys.readouterr().out
    assert blocker.read_text() == ""


def test_the_probe_runs_outside_the_launchers_process_group(cache, monkeypatch):
    """A rank of a torchrun/SLURM/Ray job that plans must not make the probe's run join its
    process group (it would wait for ranks that never come); nor may the probe's own run
    wait for its own measurement."""
    import subprocess

    for k, v in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "x",
        "SLURM_PROCID": "1",
        "RAY_ADDRESS": "127.0.0.1:6379",
    }.items():
        monkeypatch.setenv(k, v)
    seen = []

    def run(cmd, *, env, **kw):
        seen.append(env)
        out = {"peak_rss_bytes": 5 << 20, "tensor_bytes": 1 << 20}
        out = (
            {"length_kernel_bytes": 3 << 20, "doc_kernel_bytes": 1 << 20}
            if "lengths" in cmd
            else out
        )
        return subprocess.CompletedProcess(cmd, 0, json.dumps(out) + "\n", "")

    monkeypatch.setattr(runtime_probe.subprocess, "run", run)
    assert runtime_probe.cpu_measured() == {
        "runtime_bytes": 4 << 20,
        "length_kernel_bytes": 3 << 20,
        "doc_kernel_bytes": 1 << 20,
    }
    assert len(seen) == 3
    for env in seen:
        assert not {"RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(
            env
        )
        assert not [k for k in env if k.startswith(("TORCHELASTIC_", "SLURM_", "RAY_"))]
        assert env[runtime_probe.PROBING] == "1"

    monkeypatch.setenv(runtime_probe.PROBING, "1")
    with pytest.raises(runtime_probe.ProbeError, match="own run"):
        runtime_probe.cpu_runtime_bytes()


def test_onednns_isa_limit_is_another_host(cache, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 changes the kernels and (on a bf16 CPU) the precision `auto`
    picks: its runtime is measured on its own."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = runtime_probe.cache_path()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert runtime_probe.cache_path() != native
