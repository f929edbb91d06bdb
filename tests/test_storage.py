"""data.path on object storage: a real S3 endpoint (moto's server on 127.0.0.1), each node's
checked copy in its cache, reused, refused when a file differs from the manifest, evicted
beyond the limit; a run trains from s3://."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools import schema
from sftscale.storage import local_copy, read_remote_manifest
from sftscale.storage.cache import CACHE_SUBDIR, CacheError, release


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
    release(first)  # its job has ended
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
    assert len(list((tmp_path / "cache" / CACHE_SUBDIR).glob("*/manifest.json"))) == 1


def test_the_cache_deletes_only_what_it_made(s3, uploaded, prepared_dir, tmp_path):
    """data.cache_dir may be a directory of the user's: their files there are never evicted."""
    import pyarrow.fs as pafs

    mine = tmp_path / "my_experiment_results"
    mine.mkdir()
    (mine / "results.csv").write_text("precious")
    pafs.copy_files(str(prepared_dir), "runs/other2", destination_filesystem=s3)
    first = local_copy(uploaded, cache_dir=tmp_path)
    assert first.parent == tmp_path / CACHE_SUBDIR
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    release(first)
    (first.parent / "not-ours").mkdir()  # a directory the cache did not make, even inside it
    second = local_copy("s3://runs/other2", cache_dir=tmp_path, max_bytes=int(size * 1.5))
    assert second.is_dir() and not first.exists()  # its own old copy evicted, nothing else
    assert (mine / "results.csv").read_text() == "precious"
    assert (first.parent / "not-ours").is_dir()


def test_a_copy_in_use_is_not_evicted_and_the_limit_is_a_clear_error(s3, uploaded, tmp_path):
    """train + eval copies under a limit smaller than both: the run's own train copy is kept,
    and the eval copy is refused before it is downloaded, saying what to change."""
    import pyarrow.fs as pafs

    train = local_copy(uploaded, cache_dir=tmp_path)
    size = sum(f.stat().st_size for f in train.rglob("*") if f.is_file())
    pafs.copy_files(str(train), "runs/eval", destination_filesystem=s3)
    with pytest.raises(CacheError, match="data.cache_max_gb"):
        local_copy("s3://runs/eval", cache_dir=tmp_path, max_bytes=int(size * 1.5))
    assert (train / "manifest.json").is_file()
    release(train)


def test_two_jobs_under_a_small_limit_do_not_deadlock(s3, uploaded, tmp_path):
    """Two processes, each holding its own copy and asking for the other's URI under a limit
    that fits one copy: neither waits on the other's lock; both end at once."""
    import pyarrow.fs as pafs

    first = local_copy(uploaded, cache_dir=tmp_path)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    release(first)
    pafs.copy_files(str(first), "runs/second", destination_filesystem=s3)
    script = """import sys, time
from pathlib import Path
from sftscale.storage import local_copy
mine, other, cache, limit = sys.argv[1:5]
local_copy(mine, cache_dir=Path(cache), max_bytes=10**12)
time.sleep(2)  # both hold theirs now
try:
    local_copy(other, cache_dir=Path(cache), max_bytes=int(limit))
    print("fitted")
except Exception as e:
    print("refused:", type(e).__name__)
"""
    env = {**os.environ}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, a, b, str(tmp_path), str(int(size * 1.5))],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for a, b in ((uploaded, "s3://runs/second"), ("s3://runs/second", uploaded))
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("refused: CacheError" in o or "fitted" in o for o in outs), outs
