"""Shared fixtures: tiny checkpoints made on the fly, real worker servers on loopback."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen
# before anything imports triton (transformers does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> path of a tiny checkpoint (2 MoE layers x 8 experts, top-2, hidden 64), made once per session."""
    from moecluster.models.tiny import create_checkpoint
    from transformers.utils import logging

    logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    class Lazy(dict):
        def __missing__(self, family):
            made[family] = create_checkpoint(family, root / family, seed=len(made))
            self[family] = made[family]
            return made[family]

    return Lazy()


@pytest.fixture(scope="session")
def qwen3(checkpoints):
    return checkpoints["qwen3_moe"]


@contextlib.contextmanager
def running_workers(checkpoint, placement: dict[tuple[int, int], tuple[str, ...]]):
    """Starts one in-process WorkerServer (real gRPC on 127.0.0.1) per worker id in `placement`."""
    from moecluster.workers.server import WorkerServer

    ids = sorted({w for holders in placement.values() for w in holders})
    servers = {}
    try:
        for worker_id in ids:
            keys = [k for k, holders in placement.items() if worker_id in holders]
            servers[worker_id] = WorkerServer(checkpoint, keys, worker_id=worker_id).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop(0)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
