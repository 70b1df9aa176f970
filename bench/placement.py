"""Benchmark moecluster.controller.placement.place at cluster scale.

    python bench/placement.py [--workers 1024] [--experts 256] [--layers 60] [--spare 0.25]

For min_replicas 1 and 2: plan from scratch, then re-plan after removing one worker and
after adding one (each time with the previous plan as `current`).  Prints the time per plan
(best of --reps; plans are deterministic), the expert copies each re-plan costs vs
re-placing from scratch (`moves(current, place(..., current=None))`), those copies in bytes
(Mixtral bf16 experts), and the imbalance on Zipf(1.2) load: how much longer the MoE layers
wait for their busiest worker than with an even split (`placement.imbalance`; 1.0 is even).
Baseline, in the same run: the same planner blind to layers (every expert named as one layer's),
which balances each worker's total only.
Not a test: it prints the numbers and the 1 s goal, and never fails on them.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from moecluster.controller.placement import imbalance, moves, place

EXPERT_BYTES = 3 * 4096 * 14336 * 2  # Mixtral 8x7B: w1, w2, w3 of 4096 x 14336 in bf16


def zipf_load(layers: int, experts: int, s: float, seed: int) -> dict[tuple[int, int], float]:
    """Per layer, load of rank r proportional to 1/r^s with ranks shuffled; each layer sums to 1."""
    rng = random.Random(seed)
    weights = [1 / r**s for r in range(1, experts + 1)]
    total = sum(weights)
    out = {}
    for layer in range(layers):
        ranks = list(range(experts))
        rng.shuffle(ranks)
        out.update({(layer, e): weights[ranks[e]] / total for e in range(experts)})
    return out


def timed(reps: int, **kwargs) -> tuple[dict, float]:
    """(plan, best wall time in s over reps calls)."""
    best, plan = math.inf, None
    for _ in range(reps):
        start = time.perf_counter()
        plan = place(**kwargs)
        best = min(best, time.perf_counter() - start)
    return plan, best


def layer_blind(keys: list, load: dict, **kwargs) -> dict:
    """`place` with every expert renamed into one layer: each worker's total balanced, layers ignored."""
    flat = {key: (0, i) for i, key in enumerate(keys)}
    plan = place(list(flat.values()), load={flat[k]: x for k, x in load.items()}, **kwargs)
    return {key: plan[flat[key]] for key in keys}


def gib(copies: int) -> str:
    return f"{copies * EXPERT_BYTES / 2**30:,.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--spare", type=float, default=0.25, help="spare capacity over the minimum need")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    keys = [(layer, e) for layer in range(args.layers) for e in range(args.experts)]
    load = zipf_load(args.layers, args.experts, 1.2, seed=0)
    ids = [f"w{j:04d}" for j in range(args.workers)]
    print(f"{args.workers} workers, {args.layers} layers x {args.experts} experts = {len(keys)} experts, "
          f"Zipf(1.2) load, {args.spare:.0%} spare slots; one expert copy = {EXPERT_BYTES / 2**20:,.0f} MiB")
    print("goal: every plan < 1 s")
    for min_r in (1, 2):
        slots = math.ceil(len(keys) * min_r * (1 + args.spare) / args.workers)
        base = dict.fromkeys(ids, slots)
        print(f"\nmin_replicas={min_r}, {slots} slots per worker")
        plan, t = timed(args.reps, experts=keys, capacity=base, load=load, min_replicas=min_r)
        replicas = sum(map(len, plan.values()))
        blind = imbalance(layer_blind(keys, load, capacity=base, min_replicas=min_r), load, ids)
        print(f"  from scratch   {t * 1e3:7.1f} ms  {replicas} replicas "
              f"({replicas - len(keys) * min_r} extra)  imbalance {imbalance(plan, load, ids):.3f} "
              f"(layer-blind {blind:.3f}: {imbalance(plan, load, ids) / blind:.2f}x)")

        steps = [("remove 1 worker", {w: c for w, c in base.items() if w != ids[0]}, {ids[0]}),
                 ("add 1 worker", {**{w: c for w, c in base.items() if w != ids[0]}, "w_new": slots}, {ids[0]})]
        for name, capacity, dead in steps:
            new, t = timed(args.reps, experts=keys, capacity=capacity, load=load, current=plan,
                           dead=dead, min_replicas=min_r)
            scratch = place(keys, capacity, load=load, dead=dead, min_replicas=min_r)
            copies, fresh = len(moves(plan, new)), len(moves(plan, scratch))
            live = [w for w in capacity if w not in dead]
            print(f"  {name:15s}{t * 1e3:7.1f} ms  imbalance {imbalance(new, load, live):.3f} "
                  f"(from scratch {imbalance(scratch, load, live):.3f})")
            held = sum(ids[0] in hs for hs in plan.values()) if name.startswith("remove") else 0
            print(f"    moves {copies} copies vs {fresh} from scratch ({copies / max(fresh, 1):.1%}): "
                  f"{gib(copies)} vs {gib(fresh)}" + (f"; the removed worker held {held}" if held else ""))
            plan = new


if __name__ == "__main__":
    main()
