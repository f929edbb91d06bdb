import subprocess
import sys

from sftscale.cli import build_parser, main, started_by_launcher


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "sftscale", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("prepare", "inspect", "train", "export", "bench"):
        assert cmd in out.stdout
    for cmd in ("prepare", "inspect", "train", "export", "bench"):
        sub = subprocess.run(
            [sys.executable, "-m", "sftscale", cmd, "--help"], capture_output=True, text=True
        )
        assert sub.returncode == 0 and "usage" in sub.stdout


def test_train_flags_and_launcher_detection():
    """`--local` stays itself beside the deepspeed launcher's --local_rank (no prefix match)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(["train", "c.yaml", "--local", "optim.lr=1e-3"])
    assert args.local and args.local_rank is None and extra == ["optim.lr=1e-3"]
    assert not started_by_launcher({}, args.local_rank)
    args, _ = parser.parse_known_args(["--local_rank=1", "train", "c.yaml"])
    assert args.local_rank == 1 and not args.local and started_by_launcher({}, args.local_rank)
    assert started_by_launcher({"TORCHELASTIC_RUN_ID": "x"}, None)


def test_prepare_and_inspect_from_the_command_line(tmp_path, corpus_path, sp_tokenizer_dir, capsys):
    out = tmp_path / "p"
    assert (
        main(
            [
                "prepare",
                str(corpus_path),
                "--tokenizer",
                str(sp_tokenizer_dir),
                "--seq-len",
                "96",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "packing efficiency" in capsys.readouterr().out
    assert main(["inspect", str(out), "--samples", "1"]) == 0
    shown = capsys.readouterr().out
    assert "document lengths" in shown and "[[" in shown and "<|im_end|>" in shown


def test_prepare_error_is_reported_not_raised(tmp_path, sp_tokenizer_dir, capsys):
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "none.jsonl"),
                "--tokenizer",
                str(sp_tokenizer_dir),
                "--seq-len",
                "64",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "is not a file" in capsys.readouterr().err


def test_user_errors_are_reported_without_a_traceback(tmp_path, capsys):
    """A directory that was not prepared: a one-line error saying what to point at, exit 2;
    and the prepare command does not import the training config's module to report its own."""
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "Traceback" not in err
    probe = (
        "import sys; from sftscale.cli import main; "
        f"code = main(['prepare', {str(tmp_path / 'none.jsonl')!r}, '--tokenizer', {str(tmp_path)!r}, "
        f"'--seq-len', '64', '--out', {str(tmp_path / 'out')!r}]); "
        "print(code, 'sftscale.config' in sys.modules, 'sftscale.bench.suite' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert shown.stdout.split() == ["2", "False", "False"], shown.stderr[-2000:]


def test_prepare_as_the_program_ends_at_once_with_its_output_whole(
    tmp_path, corpus_path, sp_tokenizer_dir
):
    """`python -m sftscale prepare` ends without the interpreter's teardown after a local run
    that succeeded: the summary is printed in full, the output verifies, the exit code is 0;
    a failed run still exits as usual, with its code."""
    import json

    from data_tools import schema

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sftscale", "prepare", str(corpus_path), "--seq-len", "128"]
    done = subprocess.run(
        [*cmd, "--tokenizer", str(sp_tokenizer_dir), "--out", str(out), "--num-proc", "2"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == f"wrote {out}" and "documents ->" in done.stdout
    manifest = schema.read_manifest(out)
    for shard in manifest.shards:
        assert schema.file_sha256(out / shard.file) == shard.sha256
    assert json.loads((out / schema.TOKENIZER_DIR / "tokenizer_config.json").read_text())
    failed = subprocess.run(
        [*cmd, "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "error" in failed.stderr
