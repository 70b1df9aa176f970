"""A worker zygote: one Python that has imported torch and gRPC once, and forks workers on request.

Why: a worker process spends about 3 s importing Python, torch and gRPC before it
can serve, most of a scale-up's latency on the local backend.  A fork of a process
that already imported them serves in a fraction of a second.  Nothing runs torch
ops or creates gRPC objects in the zygote, so the fork inherits no threads and no
sockets; each child starts its own session, logs to its own file and runs the
ordinary worker entry point (`moecluster.workers.server.main`) with its arguments.

Protocol (a Unix socket in the cluster's run folder): one JSON line
{"argv": [...], "log": PATH} in, one JSON line {"pid": N} or {"error": TEXT} out.
The zygote reaps its children; `processes.stop` ends them by pid like any other. A
child whose asker is gone before the answer (its pid could never be recorded) is
killed at once: it would serve on, orphaned, and the zygote with it would not die.

    python -m moecluster.backends.zygote --socket RUN/zygote.sock --ready-file RUN/zygote.ready
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path


def socket_path(run_dir: Path) -> Path:
    """A short socket path for a cluster's run folder (Unix socket paths are limited to ~100 bytes)."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"moecluster-zygote-{digest}.sock"


def fork_worker(sock_path: Path, argv: list[str], log: Path, timeout: float = 30.0) -> int:
    """Asks the zygote at `sock_path` for a worker running `argv`; returns its pid. OSError if it cannot."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(sock_path))
        conn.sendall(json.dumps({"argv": argv, "log": str(log)}).encode() + b"\n")
        reply = json.loads(conn.makefile("rb").readline() or b"{}")
    if "pid" not in reply:
        raise OSError(f"zygote at {sock_path} could not fork: {reply.get('error', 'no answer')}")
    return int(reply["pid"])


def _child(argv: list[str], log: str) -> None:
    """In the forked child: a session and log of its own, default signals, then the worker's main."""
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    code = 0
    try:
        from moecluster.workers.server import main

        main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int) and exit_.code is not None:
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report and exit like an uncaught error would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(*_) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(sock_path: Path, ready_file: Path | None) -> None:
    import grpc  # noqa: F401 - imported once here, so that every fork starts with it
    import moecluster.workers.server  # noqa: F401
    import torch  # noqa: F401

    signal.signal(signal.SIGCHLD, _reap)
    sock_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(16)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": str(sock_path), "pid": os.getpid()}))
        tmp.replace(ready_file)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: (stopping.append(1), server.close()))
    while not stopping:
        try:
            conn, _ = server.accept()
        except OSError:
            break
        with conn:
            try:
                request = json.loads(conn.makefile("rb").readline())
                argv, log = [str(a) for a in request["argv"]], str(request["log"])
            except (ValueError, KeyError, TypeError) as err:
                conn.sendall(json.dumps({"error": f"bad request: {err}"}).encode() + b"\n")
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _child(argv, log)
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError as err:  # the asker died (a controller killed mid-start): nobody will record or stop it
                os.kill(pid, signal.SIGKILL)
                print(f"zygote: the asker of pid {pid} went away before its answer ({err}); stopped it",
                      file=sys.stderr, flush=True)
    sock_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    parser.add_argument("--ready-file", type=Path, help="written once listening")
    args = parser.parse_args(argv)
    serve(args.socket, args.ready_file)


if __name__ == "__main__":
    main()
