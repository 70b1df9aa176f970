"""Training through the cluster vs in one process, and the pause a scale step causes, in one run.

    python bench/training.py [--steps 20] [--hidden 256] [--intermediate 512] [--experts 16]

The model is a qwen3_moe checkpoint sized so that experts hold most of the
weights (defaults: 2 MoE layers x 16 experts of 256 x 512, ~95% of parameters
in experts). The same random batches (`moectl train`'s) train:

1. in one process: transformers' model, torch.optim.AdamW (the baseline);
2. through a local cluster of 2 workers, replicas 1, and of 2 workers, replicas 2
   (every holder computes each weight gradient): `moectl train`'s loop;
3. through the 2-worker cluster while it scales 2 -> 3 mid-run: the steps that
   wait at the boundary for the copy, and for how long;
4. through the 2-worker cluster (replicas 1) by two data-parallel trainers, each on
   half of every batch (`moectl train` with torchrun's environment, gloo on loopback),
   against one trainer on the whole batch: what the group's collectives cost (on this
   2-core machine the trainers share the cores with the workers: no speed-up to expect);
5. restartable data-parallel training (`moectl train --resume auto`): two trainers, one
   killed -9 mid-run, the group restarted as one trainer, as torchrun --max-restarts
   would: how long the survivor took to fail (saving the step it reached), how many
   steps the restart redid, and its overhead (wall time less its steps' time) against
   that of a plain `moectl train` start on the same pool;
6. saving the whole training state (`TrainingSession.save`: the workers write the
   experts', the trainer the dense model's and AdamW's) and resuming from it (every
   expert rolled back, the dense state read) after one more step, and again (the pool
   holds the save: the workers read no file), against `torch.save` / `torch.load` of
   the same model's and AdamW's state in one process.

Figures: median step time of each and its ratio to the baseline, loss equality
with the baseline, and the pause (longest wait of a step for a copy, its
step's time vs the median). Bounded: a few minutes on 2 cores; every process it
started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from moecluster.backends.local import ClusterError, LocalCluster  # noqa: E402
from moecluster.cli.train import batch_for, train  # noqa: E402
from moecluster.models.tiny import create_checkpoint  # noqa: E402
from moecluster.sdk.training import ExpertOptimizer, TrainingSession  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

BATCH, SEQ, LR, SEED = 4, 64, 1e-3, 0


def local_baseline(path: Path, steps: int) -> tuple[list[float], list[float]]:
    """(losses, step seconds) of plain PyTorch training in this process."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses, seconds = [], []
    for s in range(steps):
        x = batch_for(s, SEED, model.config.vocab_size, BATCH, SEQ)
        started = time.perf_counter()
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
    return losses, seconds


def through_cluster(path: Path, steps: int, replicas: int, home: Path, scale_at: int | None = None) -> tuple[list[dict], list]:
    """`moectl train`'s loop against a fresh 2-worker cluster; optionally `scale 3` at step `scale_at`."""
    os.environ["MOECLUSTER_HOME"] = str(home)
    cluster = LocalCluster(f"bench-r{replicas}-{scale_at}")
    cluster.up(path, workers=2, replicas=replicas, port=0)
    progress: list = []
    threads: list[threading.Thread] = []

    def before_step(s: int) -> None:
        if s == scale_at:
            thread = threading.Thread(target=lambda: progress.extend(cluster.scale(3)), daemon=True)
            thread.start()
            threads.append(thread)
            time.sleep(0.3)  # the new worker starts while training goes on; the copy follows

    try:
        rows = train(cluster.info()["controller"], str(path), steps=steps, batch=BATCH, seq=SEQ, lr=LR, seed=SEED,
                     out=home / f"run-{replicas}-{scale_at}", progress=lambda line: None, before_step=before_step,
                     save=False)
        for thread in threads:
            thread.join(timeout=120)
        return rows, progress
    finally:
        try:
            cluster.down(grace=2)
        except ClusterError:
            pass


def data_parallel_through_cluster(path: Path, steps: int, home: Path, trainers: int = 2) -> list[dict]:
    """`moectl train` as `trainers` data-parallel processes (each on BATCH / trainers rows, one thread) against a
    fresh 2-worker cluster; the first trainer's metrics rows."""
    os.environ["MOECLUSTER_HOME"] = str(home)
    cluster = LocalCluster("bench-dp")
    cluster.up(path, workers=2, replicas=1, port=0)
    try:
        out = home / "run-dp"
        procs = [subprocess.Popen(
            [sys.executable, "-m", "moecluster.cli.moectl", "train", "--controller", cluster.info()["controller"],
             "--model", str(path), "--dist-init", f"file://{home / 'dp-meet'}", "--steps", str(steps), "--batch",
             str(BATCH), "--seq", str(SEQ), "--lr", str(LR), "--seed", str(SEED), "--out", str(out)],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(trainers), "GLOO_SOCKET_IFNAME": "lo",
                 "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for rank in range(trainers)]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode:
                raise RuntimeError(f"a data-parallel trainer failed: {err[-2000:]}")
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    finally:
        try:
            cluster.down(grace=2)
        except ClusterError:
            pass


def restart_after_a_lost_trainer(path: Path, steps: int, home: Path) -> dict:
    """Two restartable trainers on a fresh 2-worker cluster, the second killed -9 once the first has logged
    half the steps, then one trainer with the same arguments; and a plain start for comparison."""
    os.environ["MOECLUSTER_HOME"] = str(home)
    cluster = LocalCluster("bench-restart")
    cluster.up(path, workers=2, replicas=1, port=0)
    saves, out = home / "restart-saves", home / "run-restart"
    saves.mkdir(parents=True)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}

    def command(*extra: str) -> list[str]:
        return [sys.executable, "-m", "moecluster.cli.moectl", "train", "--controller", cluster.info()["controller"],
                "--model", str(path), "--batch", str(BATCH), "--seq", str(SEQ), "--lr", str(LR), "--seed", str(SEED),
                *extra]

    def overhead(cmd: list[str], metrics: Path) -> tuple[float, int]:
        """Wall time of a trainer less the time of the steps it logged (the rows from the step it started
        at: a restart keeps the rows before its save), and that step."""
        started = time.perf_counter()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        if run.returncode:
            raise RuntimeError(f"a trainer failed: {run.stderr[-2000:]}")
        first = int(run.stderr.split("the pool has made ", 1)[1].split()[0]) if "the pool has made" in run.stderr else 0
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        return wall - sum(r["seconds"] for r in rows if r["step"] >= first), first

    every = max(steps // 4, 1)
    restartable = ["--resume", "auto", "--until", str(steps), "--save-every", str(every),
                   "--save-dir", str(saves), "--out", str(out)]
    try:
        procs = [subprocess.Popen(command(*restartable, "--dist-init", f"file://{home / 'restart-meet'}"),
                                  env={**env, "RANK": str(rank), "WORLD_SIZE": "2"}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for rank in range(2)]
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 600
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps // 2 + 2):  # between saves
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the trainers did not reach half their steps")
            time.sleep(0.005)
        killed = time.perf_counter()
        procs[1].kill()
        _, said = procs[0].communicate(timeout=600)
        failed_after = time.perf_counter() - killed
        procs[1].wait()
        reached = cluster.status()["step"]
        restart_s, resumed = overhead(command(*restartable), metrics)
        plain_s, _ = overhead(command("--steps", "2", "--out", str(home / "run-plain")), home / "run-plain" / "metrics.jsonl")
        return {"failed_after_s": failed_after, "saved_every": every, "reached": reached, "redone": reached - resumed,
                "restart_s": restart_s, "plain_s": plain_s}
    finally:
        try:
            cluster.down(grace=2)
        except ClusterError:
            pass


def save_and_resume_baseline(path: Path, folder: Path) -> tuple[float, float, int]:
    """(save s, load s, bytes) of torch.save / torch.load of the model's and AdamW's state after one step."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    x = batch_for(0, SEED, model.config.vocab_size, BATCH, SEQ)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    folder.mkdir(parents=True)
    started = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, folder / "state.pt")
    os.sync()
    saved = time.perf_counter() - started
    started = time.perf_counter()
    torch.load(folder / "state.pt", weights_only=True)
    return saved, time.perf_counter() - started, (folder / "state.pt").stat().st_size


def save_and_resume_through_cluster(path: Path, home: Path) -> tuple[float, float, float, int]:
    """(save s, resume s, resume-again s, bytes) of the whole training state of a 2-worker cluster after one
    step: the resume after one more step (every expert rolled back: read), then again (the pool holds the
    save: nothing read)."""
    os.environ["MOECLUSTER_HOME"] = str(home)
    cluster = LocalCluster("bench-save")
    cluster.up(path, workers=2, replicas=1, port=0, snapshot_dir=home / "snaps")
    try:
        controller = cluster.info()["controller"]
        with TrainingSession(controller) as session:
            model = session.model(str(path))
            opt = ExpertOptimizer(model, session, lr=LR, weight_decay=0.0)
            x = batch_for(0, SEED, model.config.vocab_size, BATCH, SEQ)

            def closure():
                opt.zero_grad()
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                return loss
            opt.step(closure)
            started = time.perf_counter()
            folder = session.save(model, opt)
            os.sync()
            saved = time.perf_counter() - started
            opt.step(closure)  # the pool moves on past the save
        times = []
        for _ in range(2):
            started = time.perf_counter()
            TrainingSession(controller, resume_from=folder).close()
            times.append(time.perf_counter() - started)
        return saved, times[0], times[1], sum(f.stat().st_size for f in folder.iterdir())
    finally:
        try:
            cluster.down(grace=2)
        except ClusterError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)  # as each worker: the comparison is per core
    with tempfile.TemporaryDirectory(prefix="moe-bench-train-") as tmp:
        root = Path(tmp)
        path = create_checkpoint("qwen3_moe", root / "model", hidden=args.hidden, intermediate=args.intermediate,
                                 experts=args.experts, vocab=512, seed=0)
        model = AutoModelForCausalLM.from_pretrained(path)
        total = sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        del model
        print(f"model: qwen3_moe, hidden {args.hidden}, {args.experts} experts of {args.intermediate}, "
              f"{total / 1e6:.1f}M parameters, {100 * experts / total:.0f}% in experts; batch {BATCH}x{SEQ}, "
              f"{args.steps} steps", flush=True)

        losses, base = local_baseline(path, args.steps)
        warm = slice(2, None)  # the first steps pay for first-call set-up on both sides
        base_ms = statistics.median(base[warm]) * 1000
        print(f"in one process:        {base_ms:8.1f} ms/step (median)", flush=True)
        results = {}
        for replicas in (1, 2):
            rows, _ = through_cluster(path, args.steps, replicas, root / "home")
            ms = statistics.median(r["seconds"] for r in rows[warm]) * 1000
            worst = max(abs(r["loss"] - l) / abs(l) for r, l in zip(rows, losses))
            results[replicas] = ms
            print(f"cluster, 2 workers, replicas {replicas}: {ms:8.1f} ms/step = {ms / base_ms:.2f}x one process; "
                  f"loss rel. diff <= {worst:.1e}", flush=True)

        rows = data_parallel_through_cluster(path, args.steps, root / "home")
        dp_ms = statistics.median(r["seconds"] for r in rows[warm]) * 1000
        worst = max(abs(r["loss"] - l) / abs(l) for r, l in zip(rows, losses))
        print(f"2 data-parallel trainers, replicas 1: {dp_ms:8.1f} ms/step = {dp_ms / results[1]:.2f}x one trainer "
              f"through the cluster; loss rel. diff <= {worst:.1e}", flush=True)

        scale_at = args.steps // 2
        rows, progress = through_cluster(path, args.steps, 1, root / "home", scale_at=scale_at)
        median_ms = statistics.median(r["seconds"] for r in rows[warm]) * 1000
        paused = [(r["step"], r["paused_s"], r["seconds"]) for r in rows if r["paused_s"] > 0]
        longest = max(paused, key=lambda p: p[1], default=(None, 0.0, 0.0))
        worst = max(abs(r["loss"] - l) / abs(l) for r, l in zip(rows, losses))
        print(f"scale 2 -> 3 at step {scale_at}: {len(paused)} steps waited for a copy; the longest wait "
              f"{longest[1] * 1000:.0f} ms (step {longest[0]}, {longest[2] * 1000:.0f} ms vs a median "
              f"{median_ms:.0f} ms); loss rel. diff <= {worst:.1e}; scale ended with: {progress[-1] if progress else '?'}")
        r = restart_after_a_lost_trainer(path, args.steps, root / "home")
        print(f"restartable group (--save-every {r['saved_every']}), a trainer killed -9 at step {r['reached']}: the "
              f"other failed (and saved) after {r['failed_after_s'] * 1000:.0f} ms; the restart redid {r['redone']} "
              f"steps; its overhead {r['restart_s']:.2f} s = {r['restart_s'] / r['plain_s']:.2f}x a plain start's "
              f"({r['plain_s']:.2f} s)", flush=True)
        base_save, base_load, base_bytes = save_and_resume_baseline(path, root / "baseline")
        save, resume, again, size = save_and_resume_through_cluster(path, root / "home")
        print(f"save the training state:   {save * 1000:8.1f} ms ({size / 1e6:.1f} MB) = {save / base_save:.2f}x torch.save "
              f"in one process ({base_save * 1000:.1f} ms, {base_bytes / 1e6:.1f} MB)", flush=True)
        print(f"resume from it:            {resume * 1000:8.1f} ms = {resume / base_load:.2f}x torch.load "
              f"({base_load * 1000:.1f} ms); includes the session's connect and rolling back every expert", flush=True)
        print(f"resume again (the pool holds the save: no file read): {again * 1000:8.1f} ms = "
              f"{again / base_load:.2f}x torch.load", flush=True)
        print("\nsummary")
        print(f"  one process                 {base_ms:8.1f} ms/step  1.00x")
        for replicas, ms in results.items():
            print(f"  cluster, replicas {replicas}         {ms:8.1f} ms/step  {ms / base_ms:.2f}x")
        print(f"  2 data-parallel trainers    {dp_ms:8.1f} ms/step  {dp_ms / base_ms:.2f}x "
              f"({dp_ms / results[1]:.2f}x one trainer)")
        print(f"  restart after a lost trainer {r['restart_s']:7.2f} s  {r['restart_s'] / r['plain_s']:.2f}x a plain "
              f"start; {r['redone']} steps redone")
        print(f"  pause of a scale step       {longest[1] * 1000:8.1f} ms  (training waits at the step boundary)")
        print(f"  save the training state     {save * 1000:8.1f} ms  {save / base_save:.2f}x torch.save")
        print(f"  resume from it              {resume * 1000:8.1f} ms  {resume / base_load:.2f}x torch.load")
        print(f"  resume, pool already there  {again * 1000:8.1f} ms  {again / base_load:.2f}x torch.load")


if __name__ == "__main__":
    main()
