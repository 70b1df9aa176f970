"""Affinity-aware placement: experts that tokens pick together go to the same worker (after ExFlow).

Why: for each MoE layer the frontend sends a token to every worker that holds one of its top-k
experts, once per worker. A token whose k experts share a worker costs one hidden vector out and one
partial sum back; spread over k workers it costs k of each. Routing is far from independent: some
experts are picked together much more often than chance. ExFlow co-locates experts of consecutive
layers because its tokens stay on a GPU between layers; here every layer's tokens go back to the
frontend, so what costs is the fan-out within a layer. `pairs` therefore counts the tokens that
picked two experts of one layer together (tokens/s, as frontends report them).

`regroup` takes a placement (balanced by `placement.place`) and swaps one copy each of two experts
of one layer between two workers, while a swap co-locates at least MIN_GAIN of its layer's pair
weight, up to `max_swaps` swaps (each is two expert copies over the network). A swap keeps how many
experts of each layer every worker holds, so capacity and each layer's spread hold, and it never
lets a worker's load in that layer exceed max(today's busiest there, (1 + LOAD_SLACK) x an even
share of the layer): the balance `place` keeps, as a layer waits for its busiest worker. Pure and
deterministic; the next plan goes on where one stopped.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from moecluster.controller.placement import Key, Placement

Pair = tuple[Key, Key]

MIN_GAIN = 0.0025  # a swap must co-locate >= 0.25% of its layer's pair weight: noise must not churn copies
LOAD_SLACK = 0.1  # a swap may load a worker up to 10% above its even share of the layer (or today's busiest)
MAX_SWAPS = 16  # per plan: at most 32 expert copies before the table is published again
CANDIDATES = 256  # the heaviest split pairs tried per swap: bounds the time a plan takes on a big model


def colocated_share(placement: Mapping[Key, Sequence[str]], pairs: Mapping[Pair, float]) -> float:
    """The share of the pair weight whose two experts have a worker in common (1.0 when nothing is known)."""
    total = sum(pairs.values())
    if total <= 0:
        return 1.0
    together = sum(w for (a, b), w in pairs.items() if set(placement.get(a, ())) & set(placement.get(b, ())))
    return together / total


def regroup(placement: Mapping[Key, Sequence[str]], pairs: Mapping[Pair, float], *, workers: Collection[str],
            load: Mapping[Key, float] | None = None, max_swaps: int = MAX_SWAPS) -> Placement:
    """`placement` with up to `max_swaps` swaps that co-locate experts tokens pick together.

    pairs: {((layer, a), (layer, b)): tokens/s that picked both}; pairs across layers, of unknown
    experts, or with a weight <= 0 are ignored. workers: those whose copies may move (the pool; a
    worker being drained is left alone). load: expert -> observed load (missing -> 1.0).
    """
    holders = {k: list(hs) for k, hs in placement.items()}
    pool = set(workers)
    pairs = {p: w for p, w in pairs.items() if w > 0 and p[0][0] == p[1][0] and p[0] != p[1]
             and p[0] in holders and p[1] in holders}
    layer_total: dict[int, float] = {}
    for (a, _), w in pairs.items():
        layer_total[a[0]] = layer_total.get(a[0], 0.0) + w
    if not pairs or max_swaps <= 0:
        return {k: tuple(hs) for k, hs in holders.items()}
    neighbors: dict[Key, list[tuple[Key, float]]] = {}
    for (a, b), w in pairs.items():
        neighbors.setdefault(a, []).append((b, w))
        neighbors.setdefault(b, []).append((a, w))
    per = {k: (1.0 if load is None else load.get(k, 1.0)) / len(hs) for k, hs in holders.items() if hs}
    items: dict[str, set[Key]] = {w: set() for w in pool}
    lload: dict[tuple[str, int], float] = {}  # (worker, layer) -> load
    for k, hs in holders.items():
        for w in hs:
            if w in pool:
                items[w].add(k)
                lload[w, k[0]] = lload.get((w, k[0]), 0.0) + per[k]
    if len(pool) < 2:
        return {k: tuple(hs) for k, hs in holders.items()}
    ceiling: dict[int, float] = {}
    for (w, layer), x in lload.items():
        ceiling[layer] = max(ceiling.get(layer, 0.0), x)
    for layer, top in ceiling.items():
        share = sum(x for (_, l), x in lload.items() if l == layer) / len(pool)
        ceiling[layer] = max(top, (1 + LOAD_SLACK) * share)

    def together(a: Key, b: Key) -> bool:
        return not set(holders[a]).isdisjoint(holders[b])

    def weight_around(*keys: Key) -> float:
        seen, out = set(), 0.0
        for k in keys:
            for other, w in neighbors.get(k, ()):
                pair = (k, other) if k < other else (other, k)
                if pair not in seen:
                    seen.add(pair)
                    out += w * together(k, other)
        return out

    def swap(x: Key, a: str, b: str, y: Key) -> None:
        """x's copy on worker a goes to b; y's copy (of the same layer) on b goes to a."""
        holders[x][holders[x].index(a)] = b
        holders[y][holders[y].index(b)] = a
        items[a].symmetric_difference_update((x, y))
        items[b].symmetric_difference_update((x, y))
        lload[a, x[0]] += per[y] - per[x]
        lload[b, x[0]] += per[x] - per[y]

    def best_swap(x: Key, a: str, b: str) -> tuple[float, Key] | None:
        """The partner of x's layer on b that, swapped with x's copy on a, co-locates the most (None: no
        allowed one)."""
        best, top = None, ceiling[x[0]]
        for y in sorted(items[b]):
            if y[0] != x[0] or y in items[a]:
                continue
            if lload[a, x[0]] + per[y] - per[x] > top or lload[b, x[0]] + per[x] - per[y] > top:
                continue
            before = weight_around(x, y)
            swap(x, a, b, y)
            gain = weight_around(x, y) - before
            swap(y, a, b, x)  # back
            if best is None or gain > best[0]:
                best = (gain, y)
        return best

    stuck: set[Pair] = set()  # split pairs no swap could join in this plan: the window moves past them

    def first_good_swap() -> tuple[Key, str, str, Key] | None:
        """Down the heaviest pairs split over two workers: the first swap that co-locates enough."""
        split = sorted((p for p in pairs if p not in stuck and not together(*p)), key=lambda p: (-pairs[p], p))
        for first, second in split[:CANDIDATES]:
            for x, y in ((first, second), (second, first)):  # move x next to y
                for b in sorted(w for w in holders[y] if w in pool and w not in holders[x]):
                    for a in sorted(w for w in holders[x] if w in pool):
                        option = best_swap(x, a, b)
                        if option is not None and option[0] >= MIN_GAIN * layer_total[x[0]]:
                            return x, a, b, option[1]
            stuck.add((first, second))
        return None

    for _ in range(max_swaps):
        found = first_good_swap()
        if found is None:
            break
        swap(*found)
    return {k: tuple(hs) for k, hs in holders.items()}
