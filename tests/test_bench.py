"""`sftscale bench`: grid parsing (fast) and a smoke run of the whole suite (no timing asserts)."""

import json
import os
import subprocess
import sys

import pytest

from sftscale.bench.suite import GRIDS, Point, grid_with_sets, parse_sets


def test_grid_points_and_sets():
    cpu = GRIDS["cpu"].points()
    assert cpu[0] == GRIDS["cpu"].base and len(set(cpu)) == len(cpu)
    assert {p.template for p in cpu} >= {"zero3", "zero2", "zero3_offload_optimizer"}
    sets = parse_sets(["gradient_checkpointing=on,off", "micro_batch_size=1,2"])
    assert sets == {"gradient_checkpointing": [True, False], "micro_batch_size": [1, 2]}
    grid = grid_with_sets(GRIDS["cpu"], sets)
    points = grid.points()
    assert len(points) == 4
    assert {(p.gradient_checkpointing, p.micro_batch_size) for p in points} == {
        (True, 1),
        (True, 2),
        (False, 1),
        (False, 2),
    }
    assert all(p.preset == GRIDS["cpu"].base.preset for p in points)
    # the baseline pads whatever our packing, and is shared by packed and padded points
    p = Point("tiny-llama", seq_len=512, micro_batch_size=2)
    assert p.baseline.packing == "padded" and p.baseline.id.endswith("-padded")
    with pytest.raises(ValueError, match="no DeepSpeed template"):
        Point("tiny-llama", seq_len=512, micro_batch_size=1, zero_stage=2, offload="params")
    for bad in (["nokey=1"], ["gradient_checkpointing=maybe"], ["seq_len"]):
        with pytest.raises(ValueError):
            parse_sets(bad)


@pytest.mark.distributed
def test_smoke_grid_writes_every_output(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftscale",
            "bench",
            "--grid",
            "smoke",
            "--out",
            str(out),
            "--workdir",
            str(work),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(records) == [
        "tiny-llama-s256-m2-z3-gc-packed.sftscale.json",
        "tiny-llama-s256-m2-z3-gc-padded.hf_trainer.json",
        "tiny-llama-s256-m2-z3-gc-padded.sftscale.json",
    ]
    for rec in records.values():
        f = rec["figures"]
        assert "error" not in f, f
        assert f["measured_steps"] == 2
        for key in ("tokens_per_s", "supervised_tokens_per_s", "step_time_s", "mfu", "hfu"):
            assert f[key] > 0, key
        assert f["peak_memory_bytes"] > 2**20 and f["peak_reserved_bytes"] >= f["peak_memory_bytes"]
        assert rec["device"]["kind"] == "cpu" and rec["versions"]["deepspeed"]
        assert rec["command"].startswith("sftscale bench --grid smoke")
        assert rec["ds_memory_estimate"]["params"] > 0
    hf = records["tiny-llama-s256-m2-z3-gc-padded.hf_trainer.json"]["figures"]
    assert hf["engine"] == "DeepSpeedEngine" and hf["zero_stage"] == 3
    # The padded comparison is on identical batches: same documents in the same steps.
    ours = records["tiny-llama-s256-m2-z3-gc-padded.sftscale.json"]["figures"]
    assert (ours["tokens"], ours["supervised_tokens"]) == (hf["tokens"], hf["supervised_tokens"])
    packed = records["tiny-llama-s256-m2-z3-gc-packed.sftscale.json"]["figures"]
    assert packed["padding_fraction"] < ours["padding_fraction"]

    # both sides train in what auto picks on this device (fp32 without native bf16), and say so
    from sftscale.precision import cpu_native_bf16

    expected = "bf16" if cpu_native_bf16()[0] else "fp32"
    assert {r["point"]["resolved_precision"] for r in records.values()} == {expected}
    summary = (out / "summary.md").read_text()
    for point in ("tiny-llama-s256-m2-z3-gc-packed", "tiny-llama-s256-m2-z3-gc-padded"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| `{point}`"))
        assert row.rstrip().endswith("x |"), row  # a ratio to the baseline
        assert row.split("|")[2].strip() == expected, row
    for png in ("tokens_per_s.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
