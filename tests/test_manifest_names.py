"""A manifest is data, never a path: the names it gives are single file names of the prepared
directory, and a symlink out of it is refused, for local and remote data alike (remote:
tests/test_storage.py)."""

import json
import os
import shutil

import pytest

from data_tools.schema import MANIFEST_NAME, ShardFormatError, read_manifest
from sftscale.data import PackedDataset


def _copy_with(prepared_dir, tmp_path, edit):
    out = tmp_path / "prepared"
    shutil.copytree(prepared_dir, out)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    edit(raw)
    (out / MANIFEST_NAME).write_text(json.dumps(raw))
    return out


@pytest.mark.parametrize(
    "name", ["../../evil.arrow", "/etc/passwd", "sub/shard-00000.arrow", "shard-00000.arrow/.."]
)
def test_shard_names_that_are_paths_are_refused(prepared_dir, tmp_path, name):
    (tmp_path / "evil.arrow").write_bytes(b"outside")

    def edit(raw):
        raw["shards"][0]["file"] = name

    out = _copy_with(prepared_dir, tmp_path, edit)
    with pytest.raises(ShardFormatError, match="not a shard file name"):
        read_manifest(out)


@pytest.mark.parametrize("field,value", [("dir", "../tok"), ("files", {"../x": "0"})])
def test_tokenizer_names_that_are_paths_are_refused(prepared_dir, tmp_path, field, value):
    def edit(raw):
        raw["tokenizer"][field] = value

    out = _copy_with(prepared_dir, tmp_path, edit)
    with pytest.raises(ShardFormatError, match="tokenizer"):
        read_manifest(out)


def test_a_symlink_out_of_the_prepared_directory_is_refused(prepared_dir, tmp_path):
    out = _copy_with(prepared_dir, tmp_path, lambda raw: None)
    first = json.loads((out / MANIFEST_NAME).read_text())["shards"][0]["file"]
    outside = tmp_path / "outside.arrow"
    shutil.copy(out / first, outside)
    (out / first).unlink()
    os.symlink(outside, out / first)
    with pytest.raises(ShardFormatError, match="outside the prepared directory"):
        PackedDataset(out)


def _cfg(data_dir, tmp_path):
    from sftscale.config import load_config

    return load_config(
        None,
        [
            "model.name_or_path=tiny-llama",
            f"data.path={data_dir}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"logging.output_dir={tmp_path / 'runs'}",
            "train.micro_batch_size=1",
        ],
    )


def test_a_truncated_or_bit_flipped_shard_is_named_before_launch(
    prepared_dir, tmp_path, monkeypatch
):
    from sftscale.config import ConfigError
    from sftscale.validate import validate_run

    out = _copy_with(prepared_dir, tmp_path, lambda raw: None)
    said = []
    monkeypatch.setattr("sftscale.validate.say", said.append)  # a hash is recorded once
    validate_run(_cfg(out, tmp_path), world_size=1)
    assert any("hashed and recorded" in s for s in said)
    said.clear()
    validate_run(_cfg(out, tmp_path), world_size=1)  # unchanged: not hashed again
    assert not any("hashed" in s for s in said)

    first = json.loads((out / MANIFEST_NAME).read_text())["shards"][0]["file"]
    data = bytearray((out / first).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # flipped bytes, same size
    (out / first).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"data.path: shard {first} .*sha256"):
        validate_run(_cfg(out, tmp_path), world_size=1)
    (out / first).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ConfigError, match=rf"data.path: shard {first} .*truncated"):
        validate_run(_cfg(out, tmp_path), world_size=1)


def test_a_token_id_beyond_the_vocabulary_is_refused_before_launch(prepared_dir, tmp_path):
    from sftscale.config import ConfigError
    from sftscale.validate import validate_run

    def edit(raw):
        raw["shards"][1]["max_token_id"] = raw["tokenizer"]["vocab_size"]

    out = _copy_with(prepared_dir, tmp_path, edit)
    with pytest.raises(ConfigError, match="holds token id .* beyond the"):
        validate_run(_cfg(out, tmp_path), world_size=1)
