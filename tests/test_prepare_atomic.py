"""A prepare replaces its output whole or not at all: killed at any phase, interrupted, run twice
at once, or pointed at a directory of someone else's files, it leaves the previous output intact
(or the whole new one) and nothing else behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_tools import schema
from data_tools.prepare import PrepareError, PrepareOptions, prepare

REPO = Path(__file__).resolve().parents[1]


def _files(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _prepare(src: Path, tok: Path, out: Path, seq_len: int = 128) -> schema.Manifest:
    options = PrepareOptions(seq_len=seq_len, rows_per_shard=8, progress=False)
    return prepare([str(src)], tokenizer_path=str(tok), out_dir=str(out), options=options)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def previous(tmp_path, corpus_path, sp_tokenizer_dir):
    """An output of a previous prepare (seq_len 128) and the hashes of its files."""
    out = tmp_path / "prepared"
    _prepare(corpus_path, sp_tokenizer_dir, out)
    return out, _files(out)


# Each phase: what the child patches to die there (os._exit: no cleanup runs, like SIGKILL).
PHASES = {
    "tokenizing": "data_tools.prepare:_Shards.flush",  # after the tokenizer copy, mid-shards
    "manifest": "data_tools.schema:write_manifest",  # shards written, the manifest not
    "swap": "data_tools.outdir:swap_in",  # the new directory complete, not swapped in
    "cleanup": "data_tools.outdir:_delete_old",  # swapped in, the old version not deleted
}
KILLED = textwrap.dedent(
    """
    import importlib, os, sys
    module, _, name = sys.argv[1].partition(":")
    owner = importlib.import_module(module)
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, attr, lambda *a, **k: os._exit(9))
    from data_tools.prepare import PrepareOptions, prepare
    prepare([sys.argv[2]], tokenizer_path=sys.argv[3], out_dir=sys.argv[4],
            options=PrepareOptions(seq_len=64, rows_per_shard=8, progress=False))
    """
)


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_prepare_killed_at_any_phase_leaves_one_whole_version(
    previous, corpus_path, sp_tokenizer_dir, phase
):
    out, before = previous
    target = PHASES[phase]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, target, str(corpus_path), str(sp_tokenizer_dir), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 9, killed.stderr
    manifest = schema.read_manifest(out)
    if phase == "cleanup":  # the exchange happened: the new version, whole
        assert manifest.seq_len == 64
        for s in manifest.shards:
            assert schema.file_sha256(out / s.file) == s.sha256
    else:  # the previous version, byte for byte
        assert _files(out) == before
    assert _leftovers(out) == [f".{out.name}.prepare"]  # the dead claim, nothing else

    # the next prepare removes the dead claim, saying so, and leaves nothing behind
    _prepare(corpus_path, sp_tokenizer_dir, out, seq_len=96)
    assert schema.read_manifest(out).seq_len == 96 and _leftovers(out) == []
    assert not out.with_name(f"{out.name}.{schema.QUARANTINE_NAME}").exists()


def test_an_interrupted_prepare_leaves_the_previous_output(
    previous, corpus_path, sp_tokenizer_dir, monkeypatch
):
    out, before = previous

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(schema, "write_manifest", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _prepare(corpus_path, sp_tokenizer_dir, out, seq_len=64)
    assert _files(out) == before and _leftovers(out) == []


def test_too_many_bad_records_leave_the_previous_output(previous, sp_tokenizer_dir, tmp_path):
    out, before = previous
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n' * 3)
    with pytest.raises(PrepareError, match="every record was quarantined") as e:
        _prepare(bad, sp_tokenizer_dir, out)
    kept = out.with_name(f"{out.name}.{schema.QUARANTINE_NAME}")
    assert str(kept) in str(e.value) and len(kept.read_text().splitlines()) == 3
    assert _files(out) == before and _leftovers(out) == []


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from data_tools.outdir import new_output
    with new_output(Path(sys.argv[1])):
        print("holding", flush=True)
        time.sleep(600)
    """
)


def test_a_second_prepare_into_the_same_output_is_refused_naming_the_first(
    previous, corpus_path, sp_tokenizer_dir
):
    out, before = previous
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(PrepareError, match=f"another prepare is writing.*pid {holder.pid}"):
            _prepare(corpus_path, sp_tokenizer_dir, out, seq_len=64)
        assert _files(out) == before
    finally:
        holder.kill()  # by pid: the process this test started
        holder.wait(timeout=60)
    _prepare(corpus_path, sp_tokenizer_dir, out, seq_len=64)  # its claim is dead now
    assert schema.read_manifest(out).seq_len == 64 and _leftovers(out) == []


def test_a_directory_of_other_files_is_never_replaced(tmp_path, corpus_path, sp_tokenizer_dir):
    out = tmp_path / "results"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    (out / "manifest.json").write_text("{}")
    with pytest.raises(PrepareError, match="holds files prepare did not write.*my_notes.txt"):
        _prepare(corpus_path, sp_tokenizer_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "my_notes.txt"]
    assert _leftovers(out) == []


def test_its_own_tokenizer_copy_as_input_is_kept(previous, corpus_path):
    out, before = previous
    _prepare(corpus_path, out / schema.TOKENIZER_DIR, out, seq_len=64)
    m = schema.read_manifest(out)
    assert m.seq_len == 64 and (out / schema.TOKENIZER_DIR / "tokenizer_config.json").is_file()
    assert m.tokenizer.files == json.loads(json.dumps(m.tokenizer.files))
    for name, digest in m.tokenizer.files.items():
        assert schema.file_sha256(out / schema.TOKENIZER_DIR / name) == digest


def test_a_symlinked_output_is_replaced_where_it_points(previous, corpus_path, sp_tokenizer_dir):
    out, _ = previous
    link = out.with_name("current")
    os.symlink(out, link)
    _prepare(corpus_path, sp_tokenizer_dir, link, seq_len=64)
    assert link.is_symlink() and schema.read_manifest(link).seq_len == 64
    assert schema.read_manifest(out).seq_len == 64 and _leftovers(out) == []
