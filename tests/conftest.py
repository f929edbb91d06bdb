"""Shared fixtures: a synthetic chat corpus, a SentencePiece tokenizer trained on it, and a
prepared shard directory — built once per session, no downloads."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

# Before torch/deepspeed import anywhere: CPU accelerator, one thread per process (several
# ranks share 2 cores), and a persistent cache for DeepSpeed's JIT-built op.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"),
)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray >= 2.59 turns token auth on for a local instance and, without a token given, writes one
# to ~/.ray/auth_token: the suite brings its own, so nothing lands in the user's home.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", __import__("secrets").token_hex(32))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The data cache (object-storage copies, shard verification records) in a directory of the
# suite's own, removed at exit: nothing lands in the user's ~/.cache.
_OWN_CACHE = ""
if "SFTSCALE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _OWN_CACHE = os.environ["SFTSCALE_CACHE"] = tempfile.mkdtemp(prefix="sftscale-test-cache-")
    atexit.register(shutil.rmtree, _OWN_CACHE, True)
from sftscale.jit_locks import use_environment_ninja  # noqa: E402

use_environment_ninja()  # tests that build DeepSpeed's ops directly: no rebuild

import pytest  # noqa: E402

from data_tools.synthetic import (  # noqa: E402
    conversation_texts,
    make_conversations,
    train_bpe_tokenizer,
    train_sentencepiece_tokenizer,
    write_jsonl,
)


@pytest.fixture(scope="session")
def corpus_records() -> list[dict]:
    return make_conversations(300, seed=1)


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory, corpus_records) -> Path:
    out = tmp_path_factory.mktemp("tok") / "sp"
    return train_sentencepiece_tokenizer(conversation_texts(corpus_records), out, vocab_size=400)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory, corpus_records) -> Path:
    return write_jsonl(corpus_records, tmp_path_factory.mktemp("corpus") / "chat.jsonl")


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_path, sp_tokenizer_dir) -> Path:
    from data_tools.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(out),
        options=PrepareOptions(seq_len=128, rows_per_shard=40),
    )
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, sp_tokenizer):
    """A tiny Llama saved as a Hugging Face directory, with the SentencePiece tokenizer's
    vocabulary: every run that starts from it starts from the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftscale.model import model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config("tiny-llama", vocab_size=len(sp_tokenizer))
    )
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, corpus_records) -> Path:
    """A byte-level BPE tokenizer trained here (GPT-2/Llama-3 style), with a ChatML template."""
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_bpe_tokenizer(conversation_texts(corpus_records), out, vocab_size=600)


@pytest.fixture(scope="session", params=["sentencepiece", "byte-level-bpe"])
def any_tokenizer(request, sp_tokenizer_dir, bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    path = sp_tokenizer_dir if request.param == "sentencepiece" else bpe_tokenizer_dir
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server on loopback; AWS_* variables point pyarrow (and Ray) at it."""
    pytest.importorskip("moto")
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from sftscale.launch import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir("runs")
    try:
        yield fs
    finally:
        mp.undo()
        server.stop()


_PREBUILD = pytest.StashKey()  # the background build of the ops marked builds_ops


def _ops(item) -> list[str]:
    return [op for m in item.iter_markers("builds_ops") for op in m.args]


def pytest_collection_modifyitems(session, config, items):
    """Tests that need a JIT-built op run last, in their order: the background build (below)
    has the whole suite's idle time to finish first."""
    items[:] = [i for i in items if not _ops(i)] + [i for i in items if _ops(i)]


def pytest_collection_finish(session):
    """A fresh machine builds DeepSpeed's async I/O op in ~5 min of wall time (9 of CPU) on 2
    cores, CPU Adam in ~100 s, inside the first test that needs each. The ops that collected
    tests name in `builds_ops` markers start building here instead, in the order the tests need
    them, in a process of their own at the lowest priority: the cores' idle time while the
    other tests run (a third of it, measured) absorbs the builds. Those tests run last and wait
    for the build to end (pytest_runtest_setup)."""
    wanted = list(dict.fromkeys(op for item in session.items for op in _ops(item)))
    if not wanted or session.config.option.collectonly:
        return
    # heavy (deepspeed, through sftscale.jit_locks.is_built): only when a test builds an op
    import subprocess
    import sys

    from sftscale.jit_locks import extensions_root, is_built, op_builder_name

    missing = [op for op in wanted if not is_built(op_builder_name(op))]
    if not missing:
        return
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "prebuild.log", "ab") as log:
        session.config.stash[_PREBUILD] = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-m", "sftscale", "build-ops", *missing],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: ended whole at the session's end
            env={**os.environ, "MAX_JOBS": "2"},
        )


def pytest_runtest_setup(item):
    """A test that builds ops waits for the background build, which may hold their locks (a
    test that plants a stale lock must not race a live build)."""
    proc = item.config.stash.get(_PREBUILD, None)
    if proc is None or not _ops(item) or proc.poll() is not None:
        return
    started = time.monotonic()
    proc.wait()
    print(
        f"\n[waited {time.monotonic() - started:.0f} s for the background build of DeepSpeed ops]"
    )


def pytest_sessionfinish(session, exitstatus):
    """A background build still running (a partial run that never needed it) is ended, by its
    process group, and the build lock it held is removed: the next run starts it again."""
    session.config.stash[_EXIT_STATUS] = int(exitstatus)  # for the exit watchdog (below)
    proc = session.config.stash.get(_PREBUILD, None)
    if proc is None or proc.poll() is not None:
        return
    import signal
    import subprocess

    from sftscale.jit_locks import BuildLockWatch, extensions_root

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    BuildLockWatch(extensions_root(), log=print, notify_after_s=0, stale_after_s=0).scan()


# After the summary: the process ends in ~5 s here (the environment variable is for the test of
# the watchdog below)
_EXIT_WAIT_S = float(os.environ.get("SFTSCALE_TEST_EXIT_WAIT_S", "120"))
_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    """The suite's process ends once its summary is out. A CI run on 6d82fe0 printed the
    summary (521 passed) and was killed 46 min later, still running: something left behind
    (a thread, a child, an exit handler) held its exit. Should that happen again, a watchdog
    says so after _EXIT_WAIT_S, prints every thread's stack and the processes still running
    under this one, and ends the process with the session's status (the tests' verdict is
    in). A hang that holds the interpreter's lock is ended by faulthandler 30 s later, with
    status 1."""
    import contextlib
    import faulthandler
    import shutil
    import sys
    import threading

    status = config.stash.get(_EXIT_STATUS, 1)

    def watch() -> None:
        time.sleep(_EXIT_WAIT_S)
        err = sys.__stderr__
        try:
            err.write(
                f"\n[the test process had not exited {_EXIT_WAIT_S:.0f} s after its summary: "
                f"every thread's stack, then the processes still running under it; it ends "
                f"now, with the session's status {status}]\n"
            )
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
            import psutil

            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    command = " ".join(child.cmdline())
                    err.write(f"  pid {child.pid} ({child.status()}): {command}\n")
        finally:
            err.flush()
            if _OWN_CACHE:  # its exit handler will not run
                shutil.rmtree(_OWN_CACHE, ignore_errors=True)
            os._exit(status)

    threading.Thread(target=watch, name="sftscale-exit-watchdog", daemon=True).start()
    faulthandler.dump_traceback_later(_EXIT_WAIT_S + 30, exit=True, file=sys.__stderr__)
