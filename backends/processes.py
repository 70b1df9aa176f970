"""Starting and stopping our own processes on this machine, safely.

A process is started in its own session (so it outlives the command that
started it), logs to a file, and announces itself by writing a ready file. It
is stopped by pid only after checking that the pid still runs a command line
naming our cluster folder, so a recycled pid is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


class ProcessError(RuntimeError):
    pass


@dataclass
class ProcessRecord:
    id: str
    pid: int
    address: str
    log: str
    marker: str  # a path that appears on the process's command line: proof it is ours

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ProcessRecord":
        return cls(**json.loads(path.read_text()))


Launcher = Callable[[list[str], Path], int]  # (arguments, log file) -> pid of a process running them


def spawn(process_id: str, module: str, args: list[str], run_dir: Path, log_dir: Path, timeout: float,
          record_at: Path | None = None, launcher: Launcher | None = None) -> ProcessRecord:
    """Runs `python -m MODULE ARGS --ready-file RUN_DIR/ID.ready` and waits for the ready file.

    `launcher` starts the process some other way (a zygote's fork) from the same arguments;
    the process must then name RUN_DIR on its command line too.  With `record_at`, the
    record is written there the moment the process exists (address still empty) and again
    once it serves: whoever dies while it starts leaves a trace, so nothing is orphaned.
    """
    ready = run_dir / f"{process_id}.ready"
    ready.unlink(missing_ok=True)
    log = log_dir / f"{process_id}.log"
    argv = [*args, "--ready-file", str(ready)]
    proc = None
    if launcher is None:
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        pid = proc.pid
    else:
        pid = launcher(argv, log)
    record = ProcessRecord(process_id, pid, "", str(log), str(run_dir))
    if record_at is not None:
        record.save(record_at)
    deadline = time.monotonic() + timeout
    while not ready.is_file():
        if (proc.poll() is not None) if proc is not None else not alive(record):
            status = f"status {proc.returncode}" if proc is not None else "an error"
            raise ProcessError(f"{process_id} exited with {status} while starting; its log ({log}) ends:\n" + tail(log))
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            reap(pid)
            raise ProcessError(f"{process_id} not serving after {timeout:.0f}s; see {log}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    record = ProcessRecord(process_id, pid, info["address"], str(log), str(run_dir))
    if record_at is not None:
        record.save(record_at)
    return record


def alive(record: ProcessRecord) -> bool:
    """True when the pid runs, is not a zombie, and is still the process we started."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().decode(errors="replace")
        with open(f"/proc/{record.pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and record.marker in cmdline


def unrecorded(marker: str, recorded: set[int], modules: tuple[str, ...]) -> list[ProcessRecord]:
    """Live processes naming a path inside `marker` on their command line and running one of `modules`
    (`python -m MODULE`, or forked from one), but for this one and the `recorded` pids.

    Records are written the moment a process exists, but a recorder killed between a fork's answer and
    its write leaves one nobody knows of: this finds it, by the same proof `alive` asks of a record.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in recorded or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.startswith(marker + os.sep) for a in args) and any(m in args for m in modules):
            record = ProcessRecord("unrecorded", int(entry.name), "", "", marker)
            if alive(record):
                found.append(record)
    return found


def stop(record: ProcessRecord, grace: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds; only if the pid is still ours. True if it was running."""
    if not alive(record):
        reap(record.pid)
        return False
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(record) and time.monotonic() < deadline:
        reap(record.pid)
        time.sleep(0.02)
    if alive(record):
        os.kill(record.pid, signal.SIGKILL)
        while alive(record):
            reap(record.pid)
            time.sleep(0.02)
    reap(record.pid)
    return True


def reap(pid: int) -> None:
    """Collects the exit status when the process is our child (no zombies left behind)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def tail(path: Path | str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
