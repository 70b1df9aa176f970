"""`moectl demo`: the tour, on a tiny model, in about two minutes.

Makes a tiny checkpoint, starts a local cluster, checks its answers against
`transformers`' own forward on the same checkpoint, generates, then under a
steady closed-loop load scales the pool up, kills a worker with SIGKILL, then
the frontend (the controller starts it again; clients retry), then the controller
(its supervisor starts it again), replaces a worker (a new one takes its
experts before it stops) and scales down,
counting failed requests and wrong answers all along. It stops everything it
started.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

import torch


def say(message: str) -> None:
    print(message, flush=True)


def run_demo(*, workers: int = 3, replicas: int = 2, port: int = 0, family: str = "qwen3_moe") -> int:
    from moecluster.backends.local import LocalCluster
    from moecluster.models.tiny import create_checkpoint
    from moecluster.sdk.client import Client
    from moecluster.sdk.load import ClosedLoopLoad
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    progress = lambda m: print(f"   {m}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="moecluster-demo-") as tmp:
        model_dir = create_checkpoint(family, os.path.join(tmp, f"tiny-{family}"), layers=2, experts=8, top_k=2)
        say(f"1. wrote a tiny {family} checkpoint to {model_dir}")
        cluster = LocalCluster(f"demo-{os.getpid()}")
        started = time.monotonic()
        status = cluster.up(model_dir, workers=workers, replicas=replicas, port=port, progress=progress)
        try:
            endpoint = status["endpoint"]
            say(f"2. cluster up in {time.monotonic() - started:.1f}s: frontend {endpoint}, {workers} workers, "
                f"{replicas} copies of every expert")
            client = Client(endpoint)
            reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            batch = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = reference(batch).logits
                expected_gen = reference.generate(batch[:1, :4], attention_mask=torch.ones_like(batch[:1, :4]),
                                                  max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
            error = (client.forward(batch) - expected).abs().max().item()
            say(f"3. forward {tuple(batch.shape)}: max |cluster - transformers| = {error:.2e} "
                f"({'equal' if error <= 1e-4 else 'DIFFERENT'} at 1e-4)")
            generated = client.generate(batch[:1, :4], max_new_tokens=8)
            drawn = client.generate(batch[:1, :4], max_new_tokens=8, do_sample=True, seed=7, temperature=0.8)
            torch.manual_seed(7)  # transformers draws from torch's global generator; the frontend, from one of the row's
            with torch.no_grad():
                expected_drawn = reference.generate(batch[:1, :4], attention_mask=torch.ones_like(batch[:1, :4]),
                                                    max_new_tokens=8, min_new_tokens=8, do_sample=True, temperature=0.8,
                                                    pad_token_id=0)
            chunks = [tokens for _, tokens in client.generate_stream(batch[:1, :4], max_new_tokens=8)]
            same = (torch.equal(generated, expected_gen) and torch.equal(drawn, expected_drawn)
                    and sum(chunks, []) == expected_gen[0, 4:].tolist())
            say(f"4. generate: greedy {generated[0, 4:].tolist()} (streamed: {len(chunks)} chunks, the same tokens), "
                f"sampled (seed 7, temperature 0.8) {drawn[0, 4:].tolist()} "
                f"({'same as' if same else 'DIFFERENT from'} transformers)")

            with ClosedLoopLoad(endpoint, batch, expected, clients=2, max_seconds=600) as load:
                time.sleep(2)
                t = time.monotonic()
                for line in cluster.scale(workers + 2):
                    progress(line)
                say(f"5. under load: scaled {workers} -> {workers + 2} workers in {time.monotonic() - t:.1f}s")
                victim = cluster.status()["workers"][0]
                os.kill(victim["pid"], signal.SIGKILL)
                t = time.monotonic()
                time.sleep(1.0)
                cluster.wait_converged(120, progress)
                say(f"6. under load: kill -9 {victim['id']} (pid {victim['pid']}); pool back to "
                    f"{workers + 2} workers in {time.monotonic() - t:.1f}s")
                frontend = cluster.frontend_record()
                os.kill(frontend.pid, signal.SIGKILL)
                t = time.monotonic()
                back = cluster.wait_new_frontend(frontend.pid)
                say(f"7. under load: kill -9 the frontend (pid {frontend.pid}); "
                    + (f"serving again on {back.address} in {time.monotonic() - t:.1f}s (clients retried)"
                       if back else "NOT restarted within 60s"))
                controller = cluster.controller_record()
                os.kill(controller.pid, signal.SIGKILL)
                t = time.monotonic()
                while cluster.controller_record().pid == controller.pid and time.monotonic() - t < 60:
                    time.sleep(0.1)
                cluster.wait_converged(120, progress)
                say(f"8. under load: kill -9 the controller (pid {controller.pid}); started again by its supervisor, "
                    f"state rebuilt from the workers in {time.monotonic() - t:.1f}s")
                before = {w["id"] for w in cluster.status()["workers"]}
                old = min(before, key=lambda w: int(w.rsplit("-", 1)[1]))
                t = time.monotonic()
                for line in cluster.drain(old, replace=True):
                    progress(line)
                after = {w["id"] for w in cluster.status()["workers"]}
                new = sorted(after - before)
                replaced = len(new) == 1 and after == before - {old} | set(new)
                say(f"9. under load: replaced {old} by {', '.join(new)} in {time.monotonic() - t:.1f}s "
                    f"(the new worker took its experts first; the pool kept {workers + 2})")
                t = time.monotonic()
                for line in cluster.scale(2):
                    progress(line)
                say(f"10. under load: scaled {workers + 2} -> 2 workers in {time.monotonic() - t:.1f}s")
                time.sleep(1)
            report = load.report
            say(f"11. {report.ok + report.failed + report.wrong} requests under load: {report.failed} failed, "
                f"{report.wrong} wrong answers (worst error {report.worst_error:.2e})")
            for message in report.errors[:3]:
                say(f"   failure: {message}")
            final = cluster.status()
            for w in final["workers"]:
                say(f"   {w['id']:<9} {w['address']:<20} {w['state']:<9} {len(w['experts'])} experts")
            client.close()
            ok = error <= 1e-4 and same and back is not None and replaced and report.failed == 0 and report.wrong == 0
        finally:
            stopped = cluster.down()
            say(f"12. stopped {len(stopped)} processes; nothing left running")
    say("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1

