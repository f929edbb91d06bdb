"""data.path on object storage: a real S3 endpoint (moto's server on 127.0.0.1), each node's
checked copy in its cache, reused, refused when a file differs from the manifest, evicted
beyond the limit; a run trains from s3://."""

import json

import numpy as np
import pytest

from data_tools import schema
from sftscale.storage import local_copy, read_remote_manifest


@pytest.fixture(scope="module")
def uploaded(s3, prepared_dir):
    import pyarrow.fs as pafs

    pafs.copy_files(str(prepared_dir), "runs/prepared", destination_filesystem=s3)
    return "s3://runs/prepared"


def test_a_node_copies_checks_and_reuses_prepared_data(uploaded, prepared_dir, tmp_path):
    from sftscale.data import PackedDataset

    said = []
    local = local_copy(uploaded, cache_dir=tmp_path, log=said.append)
    assert any("every file checked" in s for s in said)
    assert read_remote_manifest(uploaded) == schema.read_manifest(prepared_dir)
    ours, theirs = PackedDataset(local), PackedDataset(prepared_dir)
    assert len(ours) == len(theirs)
    for i in (0, len(ours) // 2, len(ours) - 1):
        for a, b in zip(ours.row(i), theirs.row(i), strict=True):
            np.testing.assert_array_equal(a, b)
    assert (local / "tokenizer" / "tokenizer_config.json").is_file()
    said.clear()
    assert local_copy(uploaded, cache_dir=tmp_path, log=said.append) == local
    assert said == []  # complete and unchanged: nothing downloaded


def test_a_shard_that_differs_from_the_manifest_is_refused(s3, prepared_dir, tmp_path):
    import pyarrow.fs as pafs

    pafs.copy_files(str(prepared_dir), "runs/bad", destination_filesystem=s3)
    shard = schema.read_manifest(prepared_dir).shards[0].file
    data = (prepared_dir / shard).read_bytes()
    with s3.open_output_stream(f"runs/bad/{shard}") as f:
        f.write(data[:-10] + bytes(10))  # same size, other bytes
    with pytest.raises(schema.ShardFormatError, match=f"{shard}: .* upload the prepared directory"):
        local_copy("s3://runs/bad", cache_dir=tmp_path)
    with pytest.raises(schema.ShardFormatError, match="cannot read manifest.json"):
        local_copy("s3://runs/nothing-here", cache_dir=tmp_path)


def test_copies_of_other_uris_are_evicted_beyond_the_limit(s3, uploaded, prepared_dir, tmp_path):
    import pyarrow.fs as pafs

    pafs.copy_files(str(prepared_dir), "runs/other", destination_filesystem=s3)
    first = local_copy(uploaded, cache_dir=tmp_path)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    said = []
    second = local_copy(
        "s3://runs/other", cache_dir=tmp_path, max_bytes=int(size * 1.5), log=said.append
    )
    assert second.is_dir() and not first.exists()
    assert any(f"evicted {first}" in s for s in said)


@pytest.mark.distributed
def test_training_reads_its_data_from_s3(uploaded, tmp_path):
    from helpers import train_local_subprocess
    from sftscale.config import load_config

    cfg = load_config(
        None,
        [
            "model.name_or_path=tiny-llama",
            f"data.path={uploaded}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=2",
            "train.micro_batch_size=1",
            "checkpoint.export=false",
            f"logging.output_dir={tmp_path}",
            "logging.run_name=s3",
            "logging.tensorboard=false",
        ],
    )
    train_local_subprocess(cfg)
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1
