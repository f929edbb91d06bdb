"""The suite's own exit: a run whose process does not end after its summary (a thread or child
a test left behind) is reported and ended by the watchdog in conftest.py, not left to CI's
time limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_process_held_after_the_summary_is_reported_and_ended_with_the_status(tmp_path):
    (tmp_path / "test_leaves_things_behind.py").write_text(
        "import subprocess, sys, threading\n"
        "def test_leaves_a_thread_and_a_child():\n"
        "    threading.Thread(target=threading.Event().wait).start()\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    )
    env = {**os.environ, "SFTSCALE_TEST_EXIT_WAIT_S": "1", "PYTHONPATH": str(TESTS)}
    # conftest.py loaded as a plugin, so this directory's test is all the session runs
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest"]
    done = subprocess.run(
        [*cmd, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    out = done.stdout + done.stderr
    named = [line.split() for line in out.splitlines() if "time.sleep(600)" in line]
    for words in named:  # the child is named, not ended, by the watchdog: ended here, by pid
        if words[0] == "pid":
            os.kill(int(words[1]), signal.SIGKILL)
    assert done.returncode == 0, out  # the session's status: its test passed
    assert "1 passed" in out
    assert "had not exited 1 s after its summary" in out, out
    assert "in _shutdown" in out and "in wait" in out, out  # the stacks: exit waits a thread
    assert any(words[0] == "pid" for words in named), out  # the child still running

    # and a session that failed keeps its status
    (tmp_path / "test_leaves_things_behind.py").write_text(
        "import threading\n"
        "def test_fails_and_leaves_a_thread():\n"
        "    threading.Thread(target=threading.Event().wait).start()\n"
        "    assert False\n"
    )
    done = subprocess.run(
        [*cmd, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "had not exited" in done.stderr
