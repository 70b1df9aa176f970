"""What test modules import by name (not from `conftest`: pytest swaps the `conftest` module per folder,
so `from conftest import X` would find e2e/apiserver's when both folders are collected)."""

from __future__ import annotations

import contextlib
import time

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@contextlib.contextmanager
def running_workers(checkpoint, placement: dict[tuple[int, int], tuple[str, ...]], devices: dict[str, str] | None = None):
    """Starts one in-process WorkerServer (real gRPC on 127.0.0.1) per worker id in `placement`
    (on `devices[id]`, default the CPU)."""
    from moecluster.workers.server import WorkerServer

    ids = sorted({w for holders in placement.values() for w in holders})
    servers = {}
    try:
        for worker_id in ids:
            keys = [k for k, holders in placement.items() if worker_id in holders]
            device = (devices or {}).get(worker_id, "cpu")
            servers[worker_id] = WorkerServer(checkpoint, keys, worker_id=worker_id, device=device).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop(0)


def wait_for(condition, timeout: float = 5.0, every: float = 0.02) -> bool:
    """True once `condition()` holds; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def assert_trained_like(rows: list[dict], losses: list[float], final_dir, weights: dict) -> None:
    """A training run's metrics rows (steps 0..n-1) and the model it wrote equal plain PyTorch's: losses within
    1e-4 relative, every weight within 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM

    assert [r["step"] for r in rows] == list(range(len(rows)))
    for row, expected in zip(rows, losses):
        assert abs(row["loss"] - expected) <= 1e-4 * abs(expected), (row, expected)
    trained = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).state_dict()
    assert set(trained) == set(weights)
    worst = max((trained[k] - weights[k]).abs().max().item() for k in weights)
    assert worst <= 1e-4, worst


def plain_pytorch_training(path, steps: int, batch: int, seq: int, lr: float, seed: int, keep: tuple[int, ...]):
    """`moectl train`'s loop on transformers' own model in this process, AdamW (weight decay 0): the loss of
    every step, and the weights after each step count in `keep`."""
    import torch
    from moecluster.cli.train import batch_for
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses, states = [], {}
    for s in range(steps):
        x = batch_for(s, seed, model.config.vocab_size, batch, seq)
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if s + 1 in keep:
            states[s + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, states
