"""`moectl demo`: the tour, on a tiny model, in about a minute.

Makes a tiny checkpoint, starts a local cluster, checks its answers against
`transformers`' own forward on the same checkpoint, generates, measures a short
load, kills a worker with SIGKILL and shows that requests still succeed on the
replicas, then stops everything it started.
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
    from transformers import AutoModelForCausalLM

    from moecluster.backends.local import LocalCluster
    from moecluster.models.tiny import create_checkpoint
    from moecluster.sdk.client import Client

    with tempfile.TemporaryDirectory(prefix="moecluster-demo-") as tmp:
        model_dir = create_checkpoint(family, os.path.join(tmp, f"tiny-{family}"), layers=2, experts=8, top_k=2)
        say(f"1. wrote a tiny {family} checkpoint to {model_dir}")
        cluster = LocalCluster(f"demo-{os.getpid()}")
        status = cluster.up(model_dir, workers=workers, replicas=replicas, port=port,
                            progress=lambda m: print(f"   {m}", file=sys.stderr, flush=True))
        try:
            say(f"2. cluster up: frontend {status['endpoint']}, {workers} workers, {replicas} copies of every expert")
            client = Client(status["endpoint"])
            reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            batch = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
            logits = client.forward(batch)
            with torch.no_grad():
                expected = reference(batch).logits
            error = (logits - expected).abs().max().item()
            say(f"3. forward {tuple(batch.shape)} -> logits {tuple(logits.shape)}; max |cluster - transformers| = {error:.2e}"
                f" ({'equal' if error <= 1e-4 else 'DIFFERENT'} at 1e-4)")
            generated = client.generate(batch[:1, :4], max_new_tokens=8)
            with torch.no_grad():
                expected_gen = reference.generate(batch[:1, :4], attention_mask=torch.ones_like(batch[:1, :4]),
                                                  max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
            same = torch.equal(generated, expected_gen)
            say(f"4. greedy generate: {generated[0].tolist()} ({'same as' if same else 'DIFFERS from'} transformers)")
            start, count = time.perf_counter(), 20
            for _ in range(count):
                client.forward(batch)
            elapsed = time.perf_counter() - start
            say(f"5. {count} requests of {batch.numel()} tokens: {count / elapsed:.1f} req/s, "
                f"{count * batch.numel() / elapsed:.0f} tokens/s")
            victim = status["workers"][0]
            os.kill(victim["pid"], signal.SIGKILL)
            failures, worst = 0, 0.0
            for _ in range(10):
                try:
                    worst = max(worst, (client.forward(batch) - expected).abs().max().item())
                except Exception as err:  # noqa: BLE001 - counted and shown, the demo goes on
                    failures += 1
                    say(f"   request failed: {err}")
            say(f"6. kill -9 {victim['id']} (pid {victim['pid']}): 10 more requests, {failures} failed, "
                f"max error {worst:.2e} (replicas answered)")
            status = client.status()
            for w in status.workers:
                say(f"   {w.id:<9} {w.address:<20} {w.state:<12} {len(w.experts)} experts")
            client.close()
            ok = error <= 1e-4 and same and (failures == 0 or replicas < 2)
        finally:
            stopped = cluster.down()
            say(f"7. stopped {len(stopped)} processes; nothing left running")
    say("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
