"""Keeps a local cluster's controller running: what a Deployment is on Kubernetes and Ray's restarts are on Ray.

    python -m moecluster.backends.local_supervisor --cluster-dir DIR [--move-if-port-taken]

Starts the controller (`local_controller`, recorded in DIR/controller.json) and is ready once it serves.
A controller that dies afterwards (kill -9, a crash) is started again, at the same address, after a
backoff of 0.5 s doubling to 10 s; it rebuilds its state from the workers. A controller that exits with
status 0 was asked to (`moectl down`'s Shutdown, SIGTERM): the supervisor exits with it. One that never
served is not retried: the supervisor fails with its log, so `moectl up` says what was wrong.

It imports neither torch nor gRPC: a process of a few MB that only waits. SIGTERM stops it and leaves
the controller running (`moectl resume` starts a supervisor again, which adopts it): a supervisor that
exits on purpose removes its record first. One that dies (kill -9, the OOM killer) leaves its record
behind, and the controller it supervised starts another (`watch_supervisor`), which adopts it: only the
two dying together needs `moectl resume`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from moecluster.backends.processes import ProcessError, ProcessRecord, alive, reap, spawn
from moecluster.wire.ready import announce_ready, stop_signal

log = logging.getLogger("moecluster.supervisor")
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0
HEALTHY_AFTER_S = 60.0  # a controller that ran this long resets the backoff
START_TIMEOUT_S = 120.0
WATCH_EVERY_S = 1.0  # how often a controller looks whether its supervisor still runs
RECORD = "supervisor.json"


def start(cluster_dir: Path, move_if_port_taken: bool = False) -> ProcessRecord:
    args = ["--cluster-dir", str(cluster_dir)] + (["--move-if-port-taken"] if move_if_port_taken else [])
    return spawn("controller", "moecluster.backends.local_controller", args, cluster_dir / "run", cluster_dir / "logs",
                 START_TIMEOUT_S, record_at=cluster_dir / "controller.json")


def wait_for_exit(record: ProcessRecord, stopped) -> int | None:
    """The controller's exit status once it is gone; None if the supervisor is stopped first. -1 for a
    controller adopted from an earlier supervisor (not our child: its status is not ours to read)."""
    while not stopped.wait(0.2):
        if alive(record):
            continue
        try:
            pid, status = os.waitpid(record.pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        if pid:
            return os.waitstatus_to_exitcode(status)
    return None


def supervise(cluster_dir: Path, record: ProcessRecord, stopped) -> None:
    backoff, started = FIRST_BACKOFF_S, time.monotonic()
    while True:
        status = wait_for_exit(record, stopped)
        if status is None:
            return
        if status == 0:
            log.info("the controller exited on request; nothing to supervise")
            return
        if time.monotonic() - started > HEALTHY_AFTER_S:
            backoff = FIRST_BACKOFF_S
        log.warning("the controller (pid %d) exited with status %d; starting it again", record.pid, status)
        while True:
            if stopped.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            try:
                record, started = start(cluster_dir), time.monotonic()
                break
            except ProcessError as err:
                log.warning("the controller did not start again (next try in %.1fs): %s", backoff, err)
        log.info("controller started again: pid %d at %s", record.pid, record.address)


def start_supervisor(cluster_dir: Path, timeout: float, move_if_port_taken: bool = False) -> ProcessRecord:
    """A supervisor for the cluster's controller (which it starts, or adopts if it runs); ready once it serves."""
    args = ["--cluster-dir", str(cluster_dir)] + (["--move-if-port-taken"] if move_if_port_taken else [])
    return spawn("supervisor", "moecluster.backends.local_supervisor", args, cluster_dir / "run", cluster_dir / "logs",
                 timeout, record_at=cluster_dir / RECORD)


def watch_supervisor(cluster_dir: Path, stopped: threading.Event) -> threading.Thread:
    """In the controller: starts a supervisor again when the one on record died (it adopts this controller).
    No record, no supervisor wanted: none yet, or one stopped on purpose."""
    path = cluster_dir / RECORD

    def on_record() -> ProcessRecord | None:
        try:
            return ProcessRecord.load(path)
        except (OSError, ValueError, TypeError):  # none, or half written
            return None

    def watch() -> None:
        while not stopped.wait(WATCH_EVERY_S):
            record = on_record()
            if record is None or alive(record):
                continue
            reap(record.pid)  # ours, if this controller started it
            again = on_record()
            if again is None or again.pid != record.pid or stopped.is_set():
                continue  # it exited on purpose (and removed its record) meanwhile, or another took over
            log.warning("the supervisor (pid %d) is gone; starting another, which adopts this controller", record.pid)
            try:
                start_supervisor(cluster_dir, START_TIMEOUT_S)
            except ProcessError as err:
                log.warning("the supervisor did not start again (next look in %.0fs): %s", WATCH_EVERY_S, err)

    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread


def _forget(cluster_dir: Path) -> None:
    """Removes this supervisor's record: it exits on purpose, so its controller must not start another."""
    path = cluster_dir / RECORD
    try:
        if ProcessRecord.load(path).pid == os.getpid():
            path.unlink()
    except (OSError, ValueError, TypeError):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster-dir", required=True, type=Path)
    parser.add_argument("--move-if-port-taken", action="store_true",
                        help="a new cluster's controller: listen on any free port if its own is taken")
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stopped = stop_signal()
    path = args.cluster_dir / "controller.json"
    record = ProcessRecord.load(path) if path.is_file() else None
    if record is not None and alive(record) and record.address:
        log.info("adopting the running controller: pid %d at %s", record.pid, record.address)
    else:
        try:
            record = start(args.cluster_dir, args.move_if_port_taken)
        except ProcessError as err:
            sys.exit(str(err))  # never served: nothing to retry; the message carries the controller's log
    announce_ready(args.ready_file, record.address, controller_pid=record.pid)
    supervise(args.cluster_dir, record, stopped)
    _forget(args.cluster_dir)


if __name__ == "__main__":
    main()
