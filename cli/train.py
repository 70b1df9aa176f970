"""`moectl train`: the reference training loop against a running cluster.

Random token batches, the batch of the pool's step s (counted from 0: the update it makes
is version s + 1) being
`torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed + s))`,
loss `model(input_ids=x, labels=x).loss`, AdamW (weight_decay 0) on every parameter:
the dense ones here, the experts' on their workers. The same loop on a plain
`transformers` model is what the tests compare it with. Since the batch follows the
pool's step, a run resumed from a snapshot continues exactly where that snapshot was taken.

Data parallel (`torchrun --nproc-per-node N -m moecluster.cli.moectl train ...`, or `group`): the
N trainers split each step's batch into equal parts by rank, so N trainers take the same steps as
one; the first trainer writes the metrics (the group's mean loss) and the model.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from moecluster.sdk.data_parallel import TrainerGroupBroken
from moecluster.sdk.training import ExpertOptimizer, TrainingSession


def batch_for(step: int, seed: int, vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed + step))


def train(controller: str, model_path: str, *, steps: int, batch: int, seq: int, lr: float, seed: int, out: str | Path,
          progress: Callable[[str], None] = print, before_step: Callable[[int], None] = lambda step: None,
          mid_step: Callable[[int], None] = lambda step: None, save: bool = True, device: str = "cpu",
          save_every: int = 0, save_dir: str | Path = "", resume: str | Path | None = None, cluster: str = "",
          group=None, until: int | None = None, restartable: bool = False) -> list[dict]:
    """Runs `steps` more steps (or, with `until`, the steps left until the pool has made `until` updates),
    the dense model on `device`; writes OUT/metrics.jsonl as it goes (appending when resumed) and OUT/final/
    at the end; returns the metrics. Every `save_every` steps the whole training state is saved
    (TrainingSession.save, into `save_dir` or the cluster's snapshot directory); `resume` starts from such a
    snapshot. `restartable` (needs `save_dir` and `until`): the same call, run again after a crash, goes on
    from the newest save in `save_dir` (a first run with none saves its start first; a run ends with a
    save), so a launcher that restarts it (torchrun --max-restarts), perhaps with another number of
    trainers, loses only the steps since that save; a group that breaks (a member died) with its leader
    alive has the leader save the step it reached first.
    `cluster` names the MoECluster behind a shared controller endpoint (Kubernetes). `before_step(s)`
    and `mid_step(s)` (after the forward, before the backward; s is the pool's step) are hooks for
    tests. `group`: a torch.distributed process group of trainers running this same call
    (TrainingSession's), among which each step's batch is split."""
    if steps < 1 or batch < 1 or seq < 2 or lr <= 0 or save_every < 0 or (until is not None and until < 1):
        raise ValueError(f"need steps >= 1, batch >= 1, seq >= 2 (labels are the next tokens), lr > 0, save_every >= 0 "
                         f"and until >= 1; got steps {steps}, batch {batch}, seq {seq}, lr {lr}, save_every {save_every}, "
                         f"until {until}")
    if restartable and (resume is not None or not save_dir or until is None):
        raise ValueError("a restartable run resumes from its own saves and trains until a step: it needs save_dir "
                         "and until (with steps, each restart would take that many more), and no resume")
    out = Path(out)
    rows = []
    with TrainingSession(controller, progress=progress, resume_from=save_dir if restartable else resume, cluster=cluster,
                         group=group, resume_if_saved=restartable) as session:
        size, rank, leader = session.group.size, session.group.rank, session.group.leader
        if batch % size:
            raise ValueError(f"--batch {batch} does not split among {size} trainers: make it a multiple of {size}")
        if leader:
            out.mkdir(parents=True, exist_ok=True)
        model = session.model(model_path, device=device)
        device = next(model.parameters()).device
        vocab = model.config.vocab_size
        opt = ExpertOptimizer(model, session, lr=lr, weight_decay=0.0)
        first = session.step
        resumed = session.resumed is not None
        saved = first - 1 if resumed else -1  # the pool's step of the newest save
        if restartable and not resumed:  # a crash before the first save_every goes back to here
            session.save(model, opt, save_dir)
            saved = first - 1
        elif save_every:  # a directory the workers cannot write into fails now, not at the first save
            session.check_save_dir(save_dir)
        if until is not None:
            steps = until - (first - 1)
        if until is not None and leader:
            progress(f"the pool has made {first - 1} of {until} updates" + (f"; {steps} to go" if steps > 0 else ""))
        part = slice(rank * batch // size, (rank + 1) * batch // size)
        with _metrics_file(out / "metrics.jsonl" if leader else None, keep_before=first - 1 if resumed else 0) as metrics:
            s = first - 1
            try:
                for s in range(first - 1, first - 1 + steps):
                    x = batch_for(s, seed, vocab, batch, seq)[part].to(device)
                    before_step(s)
                    row = {"step": s, **_step(session, model, opt, x, lambda: mid_step(s))}
                    row.update(tokens_per_s=round(batch * seq / row["seconds"], 1), epoch=session.dispatcher.table.epoch)
                    rows.append(row)
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if leader:
                        progress(f"step {s + 1}/{first - 1 + steps}  loss {row['loss']:.4f}  {row['seconds'] * 1000:.0f} ms")
                    if save_every and (s + 1) % save_every == 0:
                        session.save(model, opt, save_dir)
                        saved = s + 1
            except TrainerGroupBroken:  # a member died: save what the group had, if it is whole
                if (save_every or restartable) and saved != s and session.step == s + 1:
                    session.save_what_survives(model, opt, save_dir)
                raise
        if restartable and saved != session.step - 1:  # so that running it again finds nothing left to do
            session.save(model, opt, save_dir)
        if save and leader:
            session.save_pretrained(model, out / "final")
            progress(f"trained steps {first}..{session.step - 1}; model written to {out / 'final'}")
    return rows


def _step(session: TrainingSession, model, opt: ExpertOptimizer, x: torch.Tensor, mid_step: Callable[[], None]) -> dict:
    """One optimizer step of the group on its part `x` of the batch: the group's mean loss, how long it took."""
    def closure():
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        mid_step()
        loss.backward()
        return loss

    started, waited = time.perf_counter(), session.gate.waited_s
    loss = session.group.mean(float(opt.step(closure).detach()))  # of every part: the batch's loss
    seconds = time.perf_counter() - started
    return {"loss": loss, "version": session.step - 1, "seconds": round(seconds, 4),
            "paused_s": round(session.gate.waited_s - waited, 4)}


def _metrics_file(path: Path | None, keep_before: int):
    """metrics.jsonl opened for writing, keeping the rows of steps before `keep_before` (a resumed run
    replaces the steps its snapshot undid); None: nowhere (a group's other trainers)."""
    if path is None:
        return open(os.devnull, "w")
    kept = []
    if keep_before and path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < keep_before]
    metrics = open(path, "w")
    metrics.writelines(line + "\n" for line in kept)
    return metrics
