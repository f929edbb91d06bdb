"""A CPU host's runtime memory (sftscale.runtime_probe): measured once per host and software
by training a tiny model, cached, and what every CPU plan counts besides its tensors."""

from __future__ import annotations

import json

import pytest

from sftscale import runtime_probe
from sftscale.devices import CPU_RUNTIME_BYTES, GIB, host_device


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


def test_a_failed_measurement_is_said_and_planned_with_the_ceiling(cache, monkeypatch, capsys):
    def broken():
        raise runtime_probe.ProbeError("measuring this host's runtime memory failed (train): x")

    monkeypatch.setattr(runtime_probe, "measure", broken)
    device = host_device(2, 16 * GIB)
    assert (device.runtime_bytes, device.runtime_source) == (CPU_RUNTIME_BYTES, "assumed")
    out = capsys.readouterr().out
    assert "failed (train): x" in out and "assumed runtime of 0.86 GiB" in out
    assert not list(cache.glob("cpu-*.json"))  # nothing cached: the next plan tries again
