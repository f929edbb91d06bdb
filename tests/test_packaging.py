"""A non-editable install carries what the library needs and nothing at the top level but its own
packages: `pip install .` users get the DeepSpeed templates and configs, and no `benchmarks`
package lands in their site-packages."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_templates_and_configs_and_no_benchmarks_package(tmp_path):
    # a copy of the sources: the build writes build/ and *.egg-info next to them
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(
        ".venv", ".cache", ".git", "runs", "build", "*.egg-info", "__pycache__", "results"
    )
    shutil.copytree(ROOT, src, symlinks=True, ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = tmp_path.glob("sftscale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (ROOT / "ds_configs").glob("*.json"):
        assert f"sftscale/ds_configs/{template.name}" in names
    assert "sftscale/configs/tiny-cpu.yaml" in names
    assert "sftscale/bench/suite.py" in names and "sftscale/bench/hf_baseline.py" in names
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sftscale", "data_tools"}, top
