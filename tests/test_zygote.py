"""The worker zygote (backends/zygote.py) as a real process: it forks what it is asked for, and a fork
whose asker is gone before the answer (a controller killed mid-start) is stopped, the zygote serving on.
Before, the answer's broken pipe ended the zygote and left the fork running, recorded nowhere."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from moecluster.backends import zygote
from moecluster.backends.processes import alive, spawn, stop

WAIT_S = 30.0


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def test_a_fork_whose_asker_is_gone_is_stopped_and_the_zygote_serves_on(tmp_path, qwen3):
    run, logs = tmp_path / "run", tmp_path / "logs"
    run.mkdir()
    logs.mkdir()
    sock = zygote.socket_path(run)
    record = spawn("zygote", "moecluster.backends.zygote", ["--socket", str(sock)], run, logs, 120)
    try:
        # A real worker: left alone it would serve on, recorded nowhere
        worker = ["--checkpoint", str(qwen3), "--experts", "0:0-1", "--metrics-port", "-1", "--ready-file",
                  str(run / "orphan.ready")]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(sock))
            conn.sendall(json.dumps({"argv": worker, "log": str(logs / "orphan.log")}).encode() + b"\n")
        # closed before the answer: the zygote forks, cannot answer, and must stop what it forked
        deadline = time.monotonic() + WAIT_S
        log = Path(record.log)
        while "went away before its answer" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "went away before its answer" in log.read_text(), log.read_text()
        while children(record.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not children(record.pid), "the unanswered fork still runs"
        assert alive(record), "the zygote died with the broken answer"
        pid = zygote.fork_worker(sock, [*worker[:-1], str(run / "second.ready")], logs / "second.log")
        assert pid in children(record.pid)  # it serves on
        os.kill(pid, signal.SIGKILL)
    finally:
        stop(record, 5.0)
