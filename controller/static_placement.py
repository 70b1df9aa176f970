"""Launch-time placement: every expert on `replicas` distinct workers, evenly.

A stand-in for the controller's load- and migration-aware placement: it knows
nothing of load, only that copies of one expert must sit on different workers
and that every worker should hold the same number of experts (within one).
"""

from __future__ import annotations


def static_placement(
    moe_layers: list[int] | tuple[int, ...], num_experts: int, worker_ids: list[str], replicas: int = 1
) -> dict[tuple[int, int], tuple[str, ...]]:
    """(layers, E, workers, R) -> {(layer, expert): R worker ids}; ValueError when R is impossible."""
    if not worker_ids:
        raise ValueError("need at least one worker")
    if not 1 <= replicas <= len(worker_ids):
        raise ValueError(f"replicas must be between 1 and the number of workers ({len(worker_ids)}), got {replicas}")
    keys = [(layer, expert) for layer in moe_layers for expert in range(num_experts)]
    n = len(worker_ids)
    # Copy r of key j goes to worker (j + r * stride) % n: distinct workers, and each worker
    # gets an equal share of every replica rank.
    stride = max(1, n // replicas)
    return {key: tuple(worker_ids[(j + r * stride) % n] for r in range(replicas)) for j, key in enumerate(keys)}
