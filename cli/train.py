"""`moectl train`: the reference training loop against a running cluster.

Random token batches, the batch of step s being
`torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed + s))`,
loss `model(input_ids=x, labels=x).loss`, AdamW (weight_decay 0) on every parameter:
the dense ones here, the experts' on their workers. The same loop on a plain
`transformers` model is what the tests compare it with.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from moecluster.sdk.training import ExpertOptimizer, TrainingSession


def batch_for(step: int, seed: int, vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed + step))


def train(controller: str, model_path: str, *, steps: int, batch: int, seq: int, lr: float, seed: int, out: str | Path,
          progress: Callable[[str], None] = print, before_step: Callable[[int], None] = lambda step: None,
          mid_step: Callable[[int], None] = lambda step: None, save: bool = True, device: str = "cpu") -> list[dict]:
    """Runs `steps` steps, the dense model on `device`; writes OUT/metrics.jsonl as it goes and OUT/final/ at
    the end; returns the metrics. `before_step(s)` and `mid_step(s)` (after the forward, before the backward)
    are hooks for tests."""
    if steps < 1 or batch < 1 or seq < 2 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch >= 1, seq >= 2 (labels are the next tokens) and lr > 0; got "
                         f"steps {steps}, batch {batch}, seq {seq}, lr {lr}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with TrainingSession(controller, progress=progress) as session, open(out / "metrics.jsonl", "w") as metrics:
        model = session.model(model_path, device=device)
        device = next(model.parameters()).device
        vocab = model.config.vocab_size
        opt = ExpertOptimizer(model, session, lr=lr, weight_decay=0.0)
        first = session.step
        for s in range(steps):
            x = batch_for(s, seed, vocab, batch, seq).to(device)
            before_step(s)

            def closure():
                opt.zero_grad()
                loss = model(input_ids=x, labels=x).loss
                mid_step(s)
                loss.backward()
                return loss

            started, waited = time.perf_counter(), session.gate.waited_s
            loss = opt.step(closure)
            seconds = time.perf_counter() - started
            row = {"step": s, "loss": float(loss.detach()), "version": session.step - 1, "seconds": round(seconds, 4),
                   "paused_s": round(session.gate.waited_s - waited, 4), "tokens_per_s": round(batch * seq / seconds, 1),
                   "epoch": session.dispatcher.table.epoch}
            rows.append(row)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            progress(f"step {s + 1}/{steps}  loss {row['loss']:.4f}  {seconds * 1000:.0f} ms")
        if save:
            session.save_pretrained(model, out / "final")
            progress(f"trained steps {first}..{session.step - 1}; model written to {out / 'final'}")
    return rows
