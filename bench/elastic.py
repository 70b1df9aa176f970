"""Elasticity of a local cluster, measured in one run on one tiny checkpoint.

    python bench/elastic.py [--quick] [--verbose] [--only scale kill migration]

1. scale-up latency: `scale` 3 -> 5 workers (until the new layout serves) vs a
   cold `up` of 5 workers on the same model; ratio cold / scale (goal >= 5x).
2. throughput and p99 latency under a closed-loop load (2 clients, every answer
   checked against transformers' own forward): steady window vs the windows of
   3 scales 3 -> 5 and 3 scales 5 -> 3, pooled (goals: >= 80 % of steady
   throughput, p99 <= 1.5x steady; 0 failed, 0 wrong).
3. availability after kill -9 of a worker (replicas 2, under load), polling the
   controller's Status every ~20 ms: (a) the dead worker is out of the serving
   workers and every expert still has a live copy among them (goal <= 1 s),
   (b) the pool is back to spec (goal <= 10 s); 0 failed requests.
4. expert migration bandwidth: PullExpert (bulk side channel) between two worker
   processes on loopback vs a plain TCP copy of as many distinct bytes between two
   processes (goal >= 50 %); see bench/migration_bandwidth.py.

Every figure is printed with its goal, then a table of all of them. The run is
bounded (about 6 minutes, `--quick` about 3) and stops every process it started.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import grpc  # noqa: E402
import torch  # noqa: E402
from moecluster.backends.local import ClusterError, LocalCluster  # noqa: E402
from moecluster.bench.migration_bandwidth import migration_bandwidth  # noqa: E402
from moecluster.bench.report import Results, log, median, p99, spread, within  # noqa: E402
from moecluster.models.checkpoint import Checkpoint  # noqa: E402
from moecluster.models.tiny import create_checkpoint  # noqa: E402
from moecluster.protos import controller_pb2, controller_pb2_grpc  # noqa: E402
from moecluster.sdk.load import ClosedLoopLoad  # noqa: E402

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root is the package
FAMILY = "qwen3_moe"
REPLICAS = 2
POLL_S = 0.02


class StatusPoller:
    """The controller's Status over one long-lived channel (a fresh channel per poll costs ms)."""

    def __init__(self, cluster: LocalCluster):
        self.channel = grpc.insecure_channel(cluster.info()["controller"])
        self.stub = controller_pb2_grpc.ControllerStub(self.channel)

    def poll(self, timeout: float = 1.0):
        try:
            return self.stub.Status(controller_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return None

    def close(self) -> None:
        self.channel.close()


def serving_experts(status) -> tuple[set[str], dict[tuple[int, int], int]]:
    """(ids of serving workers, copies of each expert among them)."""
    ids, copies = set(), {}
    for w in status.workers:
        if w.state != "serving":
            continue
        ids.add(w.id)
        for key in zip(w.experts[::2], w.experts[1::2]):
            copies[key] = copies.get(key, 0) + 1
    return ids, copies


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- 1. scale-up latency vs cold up ---------------------------------------------------------------------------


def timed_scale(cluster: LocalCluster, workers: int, progress) -> float:
    start = time.monotonic()
    for line in cluster.scale(workers, timeout=240):
        progress(line)
    return time.monotonic() - start


# -- 2. throughput and latency while scaling ----------------------------------------------------------------


def window_figures(report, windows: list[tuple[float, float]]) -> tuple[float, float, int, float]:
    """(requests/s, p99 latency, requests, seconds) over the union of (start, end) windows."""
    latencies = [lat for start, end in windows for lat in report.window(start, end)]
    seconds = sum(end - start for start, end in windows)
    return len(latencies) / max(seconds, 1e-9), p99(latencies), len(latencies), seconds


# -- 3. kill -9 -------------------------------------------------------------------------------------------------


def kill_and_watch(poller: StatusPoller, victim, experts: int, workers: int,
                   timeout: float) -> tuple[float, float, float, int]:
    """kill -9 `victim`; seconds until (a) routed around, (epoch) a new table, (b) back to spec (math.inf: not
    within `timeout`), and the pid of a worker that took over the victim's id (0: none did).

    The dead worker is told apart by its pid, not its id: a replacement that reuses the id is a new worker.
    """
    before = poller.poll(2.0)
    epoch0 = before.epoch if before is not None else 0
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    routed = republished = back = math.inf
    reused = 0
    deadline = killed + timeout
    while time.monotonic() < deadline:
        status = poller.poll(1.0)
        now = time.monotonic() - killed
        if status is not None:
            ids, copies = serving_experts(status)
            serving = [w for w in status.workers if w.state == "serving"]
            out = all(w.pid != victim.pid for w in serving) and all(pid_alive(w.pid) for w in serving)
            reused = next((w.pid for w in status.workers if w.id == victim.id and w.pid != victim.pid), reused)
            if math.isinf(routed) and out and len(copies) == experts and min(copies.values()) >= 1:
                routed = now
            if math.isinf(republished) and status.epoch > epoch0:
                republished = now
            if (status.converged and out and len(ids) == workers and len(copies) == experts
                    and min(copies.values()) >= REPLICAS and status.endpoint):
                back = now
                break
        time.sleep(POLL_S)
    return routed, republished, back, reused


# -- 4. migration bandwidth -----------------------------------------------------------------------------------


# -- main -------------------------------------------------------------------------------------------------------


class Run:
    """What every part shares: the budget, the model, the clusters and processes to stop at the end."""

    def __init__(self, quick: bool, verbose: bool):
        self.began = time.monotonic()
        self.budget = 180.0 if quick else 360.0
        self.quick = quick
        self.progress = (lambda m: print(f"      {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
        self.results = Results()
        self.clusters: list[LocalCluster] = []
        self.procs: list[subprocess.Popen] = []
        self.slowness = 1.0  # how much slower than an idle machine the first cold up was

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.began)

    def down(self, cluster: LocalCluster) -> None:
        try:
            cluster.down(grace=2.0)
        except ClusterError:
            pass
        if cluster in self.clusters:
            self.clusters.remove(cluster)

    def cleanup(self) -> None:
        for cluster in list(self.clusters):
            self.down(cluster)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def part_scale_latency(run: Run, path: Path) -> LocalCluster:
    """1. Cold `up` of 5 workers (repeated), then scale 5 -> 3 and 3 -> 5 on the last one, which stays up."""
    log("1. scale-up latency: `scale` 3 -> 5 vs a cold `up` of 5 workers")
    reps = 2 if run.quick else 3
    colds, scales, downs = [], [], []
    cluster = LocalCluster("bench-elastic")
    reserve = 110.0 if run.quick else 135.0  # what parts 2-4 need (measured: 95-135 s on 2 idle cores)
    for rep in range(reps):
        if rep:
            if run.left() < reserve + colds[-1] + 8 * reps + 10:  # one more cold up, then the scale pairs
                break
            run.down(cluster)
        run.clusters.append(cluster)
        start = time.monotonic()
        cluster.up(path, workers=5, replicas=REPLICAS, port=0, timeout=240, progress=run.progress)
        colds.append(time.monotonic() - start)
        run.slowness = max(1.0, colds[0] / 22.0)  # a cold up takes ~22 s on 2 idle cores; a busy machine, longer
        reserve = (110.0 if run.quick else 135.0) * run.slowness
    downs.append(timed_scale(cluster, 3, run.progress))
    for rep in range(reps):
        if rep and run.left() < reserve + scales[-1] + downs[-1] + 5:
            break
        scales.append(timed_scale(cluster, 5, run.progress))
        downs.append(timed_scale(cluster, 3, run.progress))
    cold, scale = median(colds), median(scales)
    run.results.add("cold up, 5 workers", spread(colds))
    run.results.add("scale 3 -> 5 (idle)", spread(scales))
    run.results.add("scale 5 -> 3 (idle)", spread(downs))
    run.results.add("cold up / scale 3 -> 5", f"{cold / scale:.1f}x", ">= 5x", cold / scale >= 5)
    return cluster


def load_verdict(run: Run, name: str, report) -> None:
    total = report.ok + report.failed + report.wrong
    run.results.add(name, f"{report.failed} / {report.wrong} of {total} (worst error {report.worst_error:.1e})",
                    "0 / 0", total > 0 and report.failed == 0 and report.wrong == 0)
    for message in report.errors[:3]:
        log(f"      failure: {message}")


def part_load_while_scaling(run: Run, cluster: LocalCluster, batch, expected) -> None:
    """2. Steady window, then the windows of scale 3 -> 5 and 5 -> 3, under one closed-loop load."""
    steady_s = 6.0 if run.quick else 10.0
    cycles = 2 if run.quick else 3
    log(f"2. closed-loop load (2 clients, answers checked against transformers): steady {steady_s:.0f} s, "
        f"then {cycles} times scale 3 -> 5 and 5 -> 3")
    endpoint = cluster.status()["endpoint"]
    with ClosedLoopLoad(endpoint, batch, expected, clients=2, max_seconds=max(60.0, run.left()), timeout=30) as load:
        time.sleep(1.5)  # warm-up: channels, first-call costs
        steady = (time.monotonic(), time.monotonic() + steady_s)
        time.sleep(steady_s)
        ups, downs = [], []
        for _ in range(cycles):  # a scale takes well under a second: pool several for a p99 worth the name
            ups.append((time.monotonic(), time.monotonic() + timed_scale(cluster, 5, run.progress)))
            time.sleep(1.0)
            downs.append((time.monotonic(), time.monotonic() + timed_scale(cluster, 3, run.progress)))
            time.sleep(1.0)
    report = load.report
    rps, lat, n, _ = window_figures(report, [steady])
    run.results.add("steady", f"{rps:.1f} req/s, p99 {lat * 1e3:.0f} ms ({n} requests in {steady_s:.1f} s)")
    for label, windows in (("3 -> 5", ups), ("5 -> 3", downs)):
        r, l, k, seconds = window_figures(report, windows)
        run.results.add(f"during scale {label}", f"{r:.1f} req/s, p99 {l * 1e3:.0f} ms ({k} requests in "
                                                 f"{len(windows)} scalings, {seconds:.1f} s)")
        run.results.add(f"throughput {label} / steady", f"{r / rps:.0%}", ">= 80%", r / rps >= 0.8)
        run.results.add(f"p99 {label} / steady", f"{l / lat:.2f}x", "<= 1.5x", l / lat <= 1.5)
    load_verdict(run, "scaling load: failed / wrong", report)


def part_kill(run: Run, cluster: LocalCluster, batch, expected, experts: int) -> None:
    """3. kill -9 a serving worker under load; time until routed around and until back to spec."""
    kills = 2 if run.quick else 3
    routed, republished, back, reuses = [], [], [], []
    endpoint = cluster.status()["endpoint"]
    poller = StatusPoller(cluster)
    try:
        with ClosedLoopLoad(endpoint, batch, expected, clients=2, max_seconds=max(60.0, run.left()),
                            timeout=30) as load:
            time.sleep(1.0)
            for i in range(kills):
                if i and run.left() < 25 * run.slowness + 1.5 * max(back[-1], 5.0) + 3:  # part 4 needs ~25 s
                    break
                status = cluster.wait_converged(60, run.progress)
                serving = sorted((w for w in poller.poll(2.0).workers if w.state == "serving"), key=lambda w: w.id)
                victim = serving[i % len(serving)]
                a, e, b, reused = kill_and_watch(poller, victim, experts, status["desired_workers"], timeout=45)
                log(f"      kill -9 {victim.id} (pid {victim.pid}): routed around {a:.3f} s, new epoch {e:.3f} s, "
                    f"back to spec {b:.2f} s" + (f"; its replacement is also named {victim.id} (pid {reused})"
                                                 if reused else ""))
                routed.append(a)
                republished.append(e)
                back.append(b)
                if reused:
                    reuses.append(f"{victim.id} (pid {victim.pid} -> {reused})")
                if math.isinf(b):
                    log("      the pool did not come back to spec; threads the controller lost: "
                        + ("; ".join(controller_thread_errors(cluster)) or "none"))
                    break  # the next kill would only measure the same broken state
                time.sleep(1.0)
    finally:
        poller.close()
    run.results.add("kill -9: dead worker out, every expert live (a)", spread(routed, digits=3), "<= 1 s",
                    within(routed, 1.0))
    run.results.add("kill -9: new routing epoch published", spread(republished, digits=3))
    run.results.add("kill -9: back to spec, 3 serving (b)", spread(back), "<= 10 s", within(back, 10.0))
    run.results.add("kill -9: replacements get new worker ids", "; ".join(f"{r} reused" for r in reuses) or "yes",
                    "no id reused", not reuses)
    load_verdict(run, "kill -9 load: failed / wrong", load.report)


def controller_thread_errors(cluster: LocalCluster) -> list[str]:
    """Each exception that ended a thread of the controller, as 'thread: last line of its traceback'."""
    try:
        text = (cluster.dir / "logs" / "controller.log").read_text(errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for i, line in enumerate(text):
        if line.startswith("Exception in thread"):
            block = text[i + 1:]
            end = next((j for j, l in enumerate(block) if l[:1].isdigit()), len(block))  # next timestamped line
            frames = [re.search(r'File "(.*)", line (\d+)', l) for l in block[:end]]
            ours = [f"{os.path.relpath(m[1], PACKAGE)}:{m[2]}" for m in frames
                    if m and m[1].startswith(PACKAGE + os.sep) and f"{os.sep}.venv{os.sep}" not in m[1]]
            last = block[end - 1].strip() if end else "?"
            found.append(f"{line.removeprefix('Exception in thread ').rstrip(':')} died: {last}"
                         + (f" ({ours[-1]})" if ours else ""))
    return found


def guarded(run: Run, name: str, fn, *args, **kwargs):
    """Runs one part; a part that fails is reported as such and the run goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - one part's failure must not hide the others' figures
        run.results.add(f"{name}: ERROR", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}", "runs", False)
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter windows (about 3 minutes)")
    parser.add_argument("--verbose", action="store_true", help="print the clusters' progress lines on stderr")
    parser.add_argument("--only", nargs="+", choices=["scale", "kill", "migration"], default=["scale", "kill", "migration"],
                        help="parts to run: scale (1 and 2), kill (3), migration (4); default all")
    args = parser.parse_args()
    run = Run(args.quick, args.verbose)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # so that `finally` stops everything on a plain kill too
    tmp = Path(tempfile.mkdtemp(prefix="moecluster-bench-elastic-"))
    os.environ["MOECLUSTER_HOME"] = str(tmp / "home")  # never ~/.moecluster
    try:
        path = create_checkpoint(FAMILY, tmp / "model", layers=2, hidden=256, intermediate=512, experts=8, top_k=2,
                                 vocab=128)
        g = Checkpoint(path).geometry
        experts = len(g.moe_layers) * g.num_experts
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        batch = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = reference(batch).logits
        del reference
        log(f"{FAMILY}: {len(g.moe_layers)} MoE layers x {g.num_experts} experts, hidden {g.hidden}, intermediate "
            f"{g.intermediate} ({3 * g.hidden * g.intermediate * 4 / 2**20:.1f} MiB per expert in fp32), "
            f"top-{g.top_k}, batch {tuple(batch.shape)}; replicas {REPLICAS}; {os.cpu_count()} cores; "
            f"budget {run.budget:.0f} s; load average {os.getloadavg()[0]:.1f} at start")
        cluster = guarded(run, "scale latency", part_scale_latency, run, path) if "scale" in args.only else None
        if cluster is not None:
            guarded(run, "load while scaling", part_load_while_scaling, run, cluster, batch, expected)
            errors = controller_thread_errors(cluster)
            run.results.add("controller threads after the scalings", "; ".join(errors) or "all alive",
                            "all alive", not errors)
            run.down(cluster)
        # kill -9 on a pool of its own: a controller that lost a thread while scaling would not measure recovery.
        if "kill" in args.only:
            log(f"3. kill -9 one of 3 workers under load (replicas {REPLICAS}), Status polled every {POLL_S * 1e3:.0f} ms")
            cluster = LocalCluster("bench-elastic-kill")
            run.clusters.append(cluster)
            if guarded(run, "kill -9: up", cluster.up, path, workers=3, replicas=REPLICAS, port=0, timeout=240,
                       progress=run.progress) is not None:
                guarded(run, "kill -9", part_kill, run, cluster, batch, expected, experts)
            run.down(cluster)
        if "migration" in args.only:
            guarded(run, "migration", migration_bandwidth, tmp, run.results, 2 if run.quick else 3, run.procs)
    finally:
        run.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = run.results.rows
    missed = sum(1 for r in rows if r[3] is False)
    log(f"\nsummary: {sum(1 for r in rows if r[3] is not None) - missed} goals met, {missed} not met "
        f"({time.monotonic() - run.began:.0f} s; load average {os.getloadavg()[1]:.1f} over the last 5 min, "
        f"on {os.cpu_count()} cores: timings on a shared machine vary)")
    log(run.results.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
