"""deepspeed.precision=auto and the peak FLOP/s that MFU divides by."""

import os
import subprocess
import sys

import pytest
import torch

from sftscale.flops import device_peak_flops
from sftscale.model import load_model
from sftscale.precision import Precision, agree, choose, cpu_bf16_flags
from sftscale.shape import ModelShape


@pytest.mark.parametrize(
    ("requested", "native", "name", "warns"),
    [
        ("auto", True, "bf16", False),
        ("auto", False, "fp32", False),
        ("bf16", True, "bf16", False),
        ("bf16", False, "bf16", True),  # honoured, with a warning
        ("fp32", True, "fp32", False),
        ("fp32", False, "fp32", False),
    ],
)
def test_choose(requested, native, name, warns):
    p = choose(requested, native_bf16=native, why="the reason")
    assert p.name == name and bool(p.warning) is warns
    assert p.dtype == (torch.bfloat16 if name == "bf16" else torch.float32)
    if requested == "auto":
        assert p.reason.startswith("auto: the reason")


def test_every_rank_agrees_on_auto():
    auto_bf16 = choose("auto", native_bf16=True, why="x")
    assert agree(auto_bf16, native_everywhere=True).name == "bf16"
    assert agree(auto_bf16, native_everywhere=False).name == "fp32"
    # an explicit choice is never overridden
    forced = choose("bf16", native_bf16=True, why="x")
    assert agree(forced, native_everywhere=False) == forced
    assert agree(Precision("fp32", "r"), native_everywhere=True).name == "fp32"


def test_cpu_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    )
    assert cpu_bf16_flags(info) == ["avx512_bf16", "amx_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")  # an AVX2-only CPU
    assert cpu_bf16_flags(info) == []
    assert cpu_bf16_flags(tmp_path / "absent") == []


def _auto_in_subprocess(env: dict) -> str:
    code = (
        "from sftscale.precision import choose, cpu_native_bf16\n"
        "native, why = cpu_native_bf16()\n"
        "print(choose('auto', native_bf16=native, why=why).name, '|', why)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_auto_picks_fp32_where_onednn_has_no_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes a CPU with AMX compute like an AVX2-only one."""
    line = _auto_in_subprocess({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert line.startswith("fp32 |"), line
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in line


def test_auto_follows_this_cpu():
    line = _auto_in_subprocess({})
    native = bool(cpu_bf16_flags()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert line.startswith("bf16 |" if native else "fp32 |"), line


def test_model_shape_lists_the_weights_the_step_multiplies():
    torch.manual_seed(0)
    model = load_model("tiny-llama", vocab_size=97, dtype=torch.float32)
    shape = ModelShape.of(model)
    # q/o 64x64, k/v 32x64 (GQA), gate/up 176x64, down 64x176, LM head 97x64; the input
    # embedding (untied) is a lookup, not a matmul
    assert set(shape.weights) == {(64, 64), (32, 64), (176, 64), (64, 176), (97, 64)}
    tied = ModelShape.of(load_model("tiny-qwen2", vocab_size=97, dtype=torch.float32))
    assert (97, 64) in tied.weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_peak_names_what_it_measured(dtype):
    shape = ModelShape(matmul_params=1, n_layers=1, hidden=64, weights=((64, 64), (176, 64)))
    peak, source = device_peak_flops(shape, rows=128, dtype=dtype)
    assert peak > 0
    dt = str(dtype).split(".")[-1]
    assert f"2 weight shapes x 3 GEMMs, 128 rows, {dt}" in source
    assert f"{torch.get_num_threads()} CPU thread(s)" in source
