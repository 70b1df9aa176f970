"""Benchmark affinity-aware placement (`--colocate`): workers per token before and after regrouping.

    python bench/colocation.py [--layers 8] [--experts 128] [--top-k 8] [--workers 16] [--plans 100]

Synthetic routing with affinity: each token draws a topic, picks `--in-topic` of its K experts from
that topic's group of `--group` experts, the rest anywhere; a second run routes at random (the
control: nothing should move). The frontend's own counter (`frontend/coactivation.py`) turns the
tokens into the pairs it would report (excess over chance, significant only); `place` makes the
first layout (replicas 1), then `regroup` runs plan after plan (each at most MAX_SWAPS swaps) until
it stops or `--plans` is spent. Printed, for fresh tokens of the same routing: the mean number of
workers a token is sent to per layer (the frontend's fan-out: hidden states out and partial sums
back per worker), the imbalance (`placement.imbalance`), the expert copies the regroup cost (and in
bytes, for Qwen3-30B-A3B experts in bf16) and the time per plan. Not a test: it never fails on them.
"""

from __future__ import annotations

import argparse
import time

import torch
from moecluster.controller.affinity import MAX_SWAPS, MIN_GAIN, colocated_share, regroup
from moecluster.controller.placement import imbalance, moves, place
from moecluster.frontend.coactivation import CoActivation

EXPERT_BYTES = 3 * 2048 * 768 * 2  # Qwen3-30B-A3B: gate, up, down of 2048 x 768 in bf16


def route(tokens: int, experts: int, k: int, group: int, in_topic: int, gen: torch.Generator) -> torch.Tensor:
    """(tokens, k) distinct experts; in_topic of them from one of experts // group topic groups."""
    scores = torch.rand(tokens, experts, generator=gen)
    if in_topic == 0:
        return torch.topk(scores, k, dim=1).indices
    topics = torch.randint(0, experts // group, (tokens,), generator=gen)
    members = torch.arange(experts).view(1, -1) // group == topics.view(-1, 1)
    inside = torch.topk(scores.masked_fill(~members, -1), in_topic, dim=1).indices
    outside = torch.topk(scores.masked_fill(members, -1), k - in_topic, dim=1).indices
    return torch.cat([inside, outside], dim=1)


def fanout(placement: dict, routing: dict[int, torch.Tensor], workers: list[str]) -> float:
    """Mean distinct workers per token and layer (one copy per expert)."""
    column = {w: i for i, w in enumerate(workers)}
    total, count = 0.0, 0
    for layer, index in routing.items():
        owner = torch.tensor([column[placement[(layer, e)][0]] for e in range(int(index.max()) + 1)])
        hit = torch.zeros(index.shape[0], len(workers), dtype=torch.bool)
        hit.scatter_(1, owner[index], True)
        total += float(hit.sum())
        count += index.shape[0]
    return total / count


def run(args, in_topic: int, label: str) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    # A topic's experts are spread by a random relabelling, as a trained router's would be.
    relabel = {layer: torch.randperm(args.experts, generator=gen) for layer in range(args.layers)}

    def sample(tokens: int) -> dict[int, torch.Tensor]:
        return {layer: relabel[layer][route(tokens, args.experts, args.top_k, args.group, in_topic, gen)]
                for layer in range(args.layers)}

    counter = CoActivation()
    seen = sample(args.tokens)
    for layer, index in seen.items():
        for chunk in index.split(1024):
            counter.record(layer, chunk)
    seconds, report = counter.take()
    pairs = {((layer, a), (layer, b)): tokens for layer, found in report.items() for a, b, tokens in found}
    load: dict = {}
    for layer, index in seen.items():
        for e, n in enumerate(torch.bincount(index.view(-1), minlength=args.experts).tolist()):
            load[(layer, e)] = float(n)
    experts = [(layer, e) for layer in range(args.layers) for e in range(args.experts)]
    workers = [f"w{i}" for i in range(args.workers)]
    capacity = dict.fromkeys(workers, -(-len(experts) // args.workers) + 2)
    first = place(experts, capacity, load=load, max_replicas=1)
    fresh = sample(args.tokens)
    print(f"\n{label}: {len(pairs)} pairs reported ({len(pairs) / args.layers:.0f} per layer), "
          f"{sum(1 for _ in experts)} experts on {args.workers} workers, top-{args.top_k}")
    print(f"{'plans':>6} {'workers/token':>14} {'ratio':>6} {'pairs together':>15} {'imbalance':>10} "
          f"{'copies':>7} {'GiB':>6} {'s/plan':>7}")
    base = fanout(first, fresh, workers)

    def row(plans: int, placement: dict, seconds: float) -> None:
        f = fanout(placement, fresh, workers)
        copies = len(moves(first, placement))
        print(f"{plans:>6} {f:>14.3f} {f / base:>6.3f} {colocated_share(placement, pairs):>15.1%} "
              f"{imbalance(placement, load, workers):>10.3f} {copies:>7} {copies * EXPERT_BYTES / 2**30:>6.2f} "
              f"{seconds:>7.2f}")

    row(0, first, 0.0)
    current, spent, plans = first, 0.0, 0
    marks = {1, 5, 10, 25, 50, 100, 200, 400, args.plans}
    while plans < args.plans:
        start = time.perf_counter()
        after = regroup(current, pairs, workers=workers, load=load)
        spent += time.perf_counter() - start
        plans += 1
        settled = after == current
        current = after
        if settled or plans in marks:
            row(plans, current, spent / plans)
        if settled:
            print(f"       settled: no swap co-locates {MIN_GAIN:.2%} of a layer's pair weight any more")
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--group", type=int, default=16, help="experts per topic")
    parser.add_argument("--in-topic", type=int, default=6, help="of a token's K experts, how many from its topic")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per layer counted, and measured")
    parser.add_argument("--plans", type=int, default=100, help=f"plans at most (each <= {MAX_SWAPS} swaps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args, args.in_topic, f"routing with affinity ({args.in_topic} of {args.top_k} picks in a topic of {args.group})")
    run(args, 0, "random routing (the control)")


if __name__ == "__main__":
    main()
