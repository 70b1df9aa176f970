"""Load- and migration-aware expert placement: which workers hold which experts.

Why: a MoE layer is as slow as its busiest worker *in that layer* (the frontend sends a layer's
tokens out and waits for every part), and routing is skewed (roughly Zipf), so hot experts get
extra replicas and the frontend splits their load over them, as DeepSeek's EPLB does, and each
layer's experts are spread evenly over the workers, as EPLB balances each layer.  Balancing only
each worker's total is not enough: with the same Zipf ranks in every layer, it put a whole layer
on one worker.  Unlike EPLB we also pay for migration: every new replica is a copy of an expert's
weights over the network (~350 MB for Mixtral in bf16).  The controller re-plans whenever load
shifts or workers come and go, so `place` keeps every current replica it can and moves only what
liveness, capacity or balance demand.

A plan is made in four steps:

1. counts: every expert gets `min_replicas`; spare slots go one at a time (a heap) to the
   expert whose replicas are the hottest, until no replica carries more than its layer's
   average expert (but at least SPREAD and at most all of a worker's even share of the layer).
   A reserve of free slots (one per worker, at most a quarter of the spare) lets later moves
   and a dead worker's experts land without swaps; re-plans spend it rather than drop live
   extras.
2. keep: current replicas on live workers stay, up to the new counts and capacities.
3. fill: missing replicas, heaviest first (LPT), go to the worker with a free slot that lacks
   the expert and carries the least of its layer (then the least in all): first the experts with
   extra replicas (they need many workers with room), then the rest layer by layer; if none
   qualifies, an augmenting path shifts other replicas.
4. polish: a bounded local search moves (or swaps) replicas from a layer's busiest workers to its
   idlest while any worker carries over LAYER_TOLERANCE more than its even share of the layer, then
   from the busiest workers to the idlest while any is outside TOLERANCE of the mean load, and
   pushes no layer further over its band; only where a copy buys at least MIN_GAIN (in a layer,
   LAYER_MIN_GAIN) of balance.

`place` is pure and deterministic (ties broken by worker id and expert position), and costs
O(replicas * log(workers) + layers * workers) plus the bounded polish.
"""

from __future__ import annotations

import bisect
import heapq
import math
import numbers
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence

Key = tuple[int, int]
Placement = dict[Key, tuple[str, ...]]

SPREAD = 0.1  # replicas never need to be finer than 10% of a worker's even share of their layer
TOLERANCE = 0.05  # polish leaves a worker alone within +-5% of the mean load
LAYER_TOLERANCE = 0.1  # and up to 10% over its even share of a layer (a few experts each: coarser)
HYSTERESIS = 0.25  # an existing extra replica wins ties by 25%: load noise must not churn copies
MIN_GAIN = 0.01  # a copy must cut band violation by >= 1% of the mean load to be worth it
LAYER_MIN_GAIN = 0.03  # or 3% of a layer's even share: a layer is one of many a step waits for
PARTNERS = 8  # polish tries the 8 busiest x 8 idlest workers for a useful move
MAX_POLISH_MOVES = 2048  # bounds polish time on huge clusters


class PlacementError(ValueError):
    """The placement asked for cannot exist; the message says what to change."""


def place(
    experts: Sequence[Key],
    capacity: Mapping[str, int],
    *,
    load: Mapping[Key, float] | None = None,
    current: Mapping[Key, Sequence[str]] | None = None,
    dead: Collection[str] = (),
    min_replicas: int = 1,
    max_replicas: int | None = None,
) -> Placement:
    """Plan which live workers hold each expert.

    experts: every (layer, expert) that must be served.  capacity: live worker id -> slots.
    load: expert -> observed load (missing -> 1.0).  current: today's placement (may name
    dead or unknown workers).  dead: workers to ignore.  Returns {expert: distinct worker
    ids}, with min_replicas <= len <= max_replicas (default: all live workers) and no worker
    over capacity.  Raises PlacementError when that is impossible.
    """
    keys = list(experts)
    n = len(keys)
    index = {k: i for i, k in enumerate(keys)}
    if len(index) != n:
        raise PlacementError("experts lists a key twice; pass each (layer, expert) once")
    gone = set(dead)
    for w, c in capacity.items():
        if not isinstance(c, numbers.Integral) or c < 0:
            raise PlacementError(f"capacity of worker {w!r} must be an int >= 0, got {c!r}")
    workers = sorted(w for w, c in capacity.items() if c > 0 and w not in gone)
    nw = len(workers)
    cap = [min(int(capacity[w]), n) for w in workers]  # a worker holds an expert at most once
    top = nw if max_replicas is None else min(max_replicas, nw)
    _check(n, nw, sum(cap), min_replicas, max_replicas)
    if n == 0:
        return {}
    loads = [1.0 if load is None else load.get(k, 1.0) for k in keys]
    for k, x in zip(keys, loads):
        if not (isinstance(x, numbers.Real) and math.isfinite(x) and x >= 0):
            raise PlacementError(f"load of {k} must be a finite number >= 0, got {x!r}")
    loads = [float(x) for x in loads]
    layer_ids = {layer: l for l, layer in enumerate(sorted({k[0] for k in keys}))}
    layer = [layer_ids[k[0]] for k in keys]
    share = [0.0] * len(layer_ids)  # a worker's even share of each layer's load
    for l, x in zip(layer, loads):
        share[l] += x / nw

    wid = {w: j for j, w in enumerate(workers)}
    cur: list[list[int]] = [[] for _ in range(n)]
    for k, hs in (current or {}).items():
        i = index.get(k)
        if i is not None:
            for w in hs:
                j = wid.get(w)
                if j is not None and j not in cur[i]:
                    cur[i].append(j)

    spare = sum(cap) - n * min_replicas
    # Keep a reserve of free slots for later moves, but spend it rather than drop live extras:
    # after a worker dies, its experts land in the reserve and nothing else moves.
    live_extras = sum(max(0, min(len(c), top) - min_replicas) for c in cur)
    budget = min(spare, max(spare - min(nw, spare // 4), live_extras))
    weight = [x / share[l] if share[l] > 0 else 0.0 for l, x in zip(layer, loads)]  # in even shares
    # A replica is hot while it carries more than its layer's average expert (at least SPREAD of a worker's
    # share, at most a whole share): evenly loaded experts get no extras unless a layer has fewer experts than
    # there are workers, and a hot expert is split until its replicas pack as easily as the rest.
    sums, sizes = [0.0] * len(share), [0] * len(share)
    for l, x in zip(layer, weight):
        sums[l], sizes[l] = sums[l] + x, sizes[l] + 1
    hot = [max(SPREAD, min(1.0, s / c)) for s, c in zip(sums, sizes)]
    counts = _counts([x / hot[l] for l, x in zip(layer, weight)], [len(c) for c in cur], min_replicas, top, budget,
                     1.0 + 1e-9)  # a hair over 1: float noise must not make evenly loaded experts hot
    plan = _Plan(loads, layer, share, counts, cap, min_replicas)
    plan.keep(cur)
    plan.fill(weight)
    plan.polish()
    return {k: tuple(workers[j] for j in plan.holders[i]) for i, k in enumerate(keys)}


def moves(before: Mapping[Key, Sequence[str]], after: Mapping[Key, Sequence[str]]) -> list[tuple[Key, str]]:
    """Replica copies `after` has that `before` lacks: [(expert, worker)], in `after`'s order."""
    out = []
    for key, hs in after.items():
        old = set(before.get(key, ()))
        out.extend((key, w) for w in hs if w not in old)
    return out


def imbalance(
    placement: Mapping[Key, Sequence[str]], load: Mapping[Key, float] | None, workers: Collection[str]
) -> float:
    """How much longer the MoE layers take than with their load split evenly (>= 1.0): over all layers,
    the busiest worker's load in each layer, summed, over the even shares, summed.  Each expert's load
    (missing -> 1.0) is split evenly over its replicas; `workers` holding nothing count with 0, as do any
    named only in placement.  With one layer, max / mean worker load."""
    size, busy = _layer_loads(placement, load, workers)
    total = sum(sum(b.values()) for b in busy.values())
    return sum(max(b.values()) for b in busy.values()) * size / total if total > 0 else 1.0


def layer_imbalance(
    placement: Mapping[Key, Sequence[str]], load: Mapping[Key, float] | None, workers: Collection[str]
) -> dict[int, float]:
    """Per layer, its busiest worker's load over an even share of it (1.0 is even); layers with no load left out."""
    size, busy = _layer_loads(placement, load, workers)
    return {layer: max(b.values()) * size / sum(b.values()) for layer, b in sorted(busy.items()) if sum(b.values()) > 0}


def _layer_loads(placement: Mapping[Key, Sequence[str]], load: Mapping[Key, float] | None,
                 workers: Collection[str]) -> tuple[int, dict[int, dict[str, float]]]:
    """(workers in the pool, {layer: {worker: its load in the layer}}) for the two measures above."""
    pool = set(workers) | {w for hs in placement.values() for w in hs}
    busy: dict[int, dict[str, float]] = {}
    for key, hs in placement.items():
        if hs:
            part = (1.0 if load is None else load.get(key, 1.0)) / len(hs)
            layer = busy.setdefault(key[0], {})
            for w in hs:
                layer[w] = layer.get(w, 0.0) + part
    return len(pool), busy


def _check(n: int, nw: int, slots: int, lo: int, hi: int | None) -> None:
    """Raise PlacementError unless n experts x lo replicas fit on nw workers with `slots`."""
    if lo < 1:
        raise PlacementError(f"min_replicas must be >= 1, got {lo}")
    if hi is not None and hi < lo:
        raise PlacementError(f"max_replicas ({hi}) is below min_replicas ({lo}); raise it or pass None")
    if n and nw == 0:
        raise PlacementError("no live worker with capacity > 0: start workers before placing experts")
    if n and lo > nw:
        raise PlacementError(
            f"min_replicas={lo} needs {lo} distinct live workers but only {nw} are live: "
            f"add {lo - nw} worker(s) or lower min_replicas")
    if slots < n * lo:
        raise PlacementError(
            f"{n} experts x {lo} replicas need {n * lo} slots but live workers offer {slots} "
            f"(capacity capped at one copy per expert per worker): add capacity or workers, "
            f"or lower min_replicas")


def _counts(weight: list[float], held: list[int], lo: int, hi: int, budget: int, floor: float) -> list[int]:
    """Replicas per expert: lo each, then up to `budget` extras, each to the expert whose
    replicas carry the most weight, while that exceeds `floor` and the expert is below hi."""
    counts, boost = [lo] * len(weight), 1.0 + HYSTERESIS
    # Min-heap of (-priority, expert): weight per replica, boosted for a replica that exists.
    heap = [(-x / lo * (boost if held[i] > lo else 1.0), i) for i, x in enumerate(weight) if x > 0 and lo < hi]
    heapq.heapify(heap)
    while budget > 0 and heap and -heap[0][0] > floor:
        i = heapq.heappop(heap)[1]
        counts[i] = c = counts[i] + 1
        budget -= 1
        if c < hi:
            heapq.heappush(heap, (-weight[i] / c * (boost if held[i] > c else 1.0), i))
    return counts


def _violation(lo: float, hi: float) -> Callable[[float], float]:
    """How far a load lies outside the band [lo, hi]."""
    return lambda x: x - hi if x > hi else (lo - x if x < lo else 0.0)


class _Plan:
    """Mutable state of one plan; experts, layers and workers are list indices."""

    def __init__(self, loads: list[float], layer: list[int], share: list[float], counts: list[int],
                 cap: list[int], lo: int):
        self.loads, self.layer, self.share, self.counts, self.cap, self.lo = loads, layer, share, counts, cap, lo
        self.per = [x / c for x, c in zip(loads, counts)]  # load of one replica
        self.holders: list[list[int]] = [[] for _ in loads]
        self.items: list[set[int]] = [set() for _ in cap]
        self.layer_items: list[list[set[int]]] = [[set() for _ in cap] for _ in share]  # [layer][worker]
        self.wload = [0.0] * len(cap)
        self.lload = [[0.0] * len(cap) for _ in share]  # [layer][worker]
        # A layer is as slow as its busiest worker: only a worker over its band slows it down (one left under
        # it is the whole load's to fill).
        self.over = [_violation(0.0, (1 + LAYER_TOLERANCE) * s) for s in share]

    def _put(self, i: int, j: int, sign: int) -> None:
        """Account expert i's replica on worker j (sign 1) or take it off (sign -1); holders aside."""
        l, p = self.layer[i], self.per[i] * sign
        (self.items[j].add if sign > 0 else self.items[j].discard)(i)
        (self.layer_items[l][j].add if sign > 0 else self.layer_items[l][j].discard)(i)
        self.wload[j] += p
        self.lload[l][j] += p

    def _add(self, i: int, j: int) -> None:
        self.holders[i].append(j)
        self._put(i, j, 1)

    def _remove(self, i: int, j: int) -> None:
        self.holders[i].remove(j)
        self._put(i, j, -1)

    def _shift(self, i: int, src: int, dst: int) -> None:
        """Move expert i's replica from src to dst, keeping its position among the replicas."""
        hs = self.holders[i]
        hs[hs.index(src)] = dst
        self._put(i, src, -1)
        self._put(i, dst, 1)

    def _recount(self, i: int, c: int) -> None:
        """Set expert i's replica count to c (an extra is given up), re-splitting its load."""
        old, self.counts[i] = self.per[i], c
        self.per[i] = self.loads[i] / c
        for j in self.holders[i]:
            self.wload[j] += self.per[i] - old
            self.lload[self.layer[i]][j] += self.per[i] - old

    def keep(self, cur: list[list[int]]) -> None:
        """Keep current live replicas: surplus copies leave the workers busiest in the expert's layer,
        and a worker over capacity sheds its heaviest replicas (fill re-places them)."""
        surplus = []
        for i, hs in enumerate(cur):
            if len(hs) <= self.counts[i]:
                for j in hs:
                    self._add(i, j)
            else:
                surplus.append(i)
        for i in surplus:
            busy = self.lload[self.layer[i]]
            stay = set(sorted(cur[i], key=lambda j: (busy[j], self.wload[j], j))[: self.counts[i]])
            for j in cur[i]:
                if j in stay:
                    self._add(i, j)
        for j, its in enumerate(self.items):
            if len(its) > self.cap[j]:
                for i in sorted(its, key=lambda i: (-self.per[i], i))[: len(its) - self.cap[j]]:
                    self._remove(i, j)

    def fill(self, weight: list[float]) -> None:
        """Place missing replicas, each on the eligible worker with the least load in the expert's layer,
        then the least in all: first the experts with extra replicas, heaviest first over all layers (a hot
        expert needs many workers with room), then the rest layer by layer, heaviest first."""
        todo = sorted((i for i in range(len(self.holders)) if len(self.holders[i]) < self.counts[i]),
                      key=lambda i: (-weight[i] / self.counts[i], i))
        self._fill([i for i in todo if self.counts[i] > self.lo])
        by_layer: dict[int, list[int]] = {}
        for i in todo:
            if self.counts[i] <= self.lo:
                by_layer.setdefault(self.layer[i], []).append(i)
        for experts in by_layer.values():
            self._fill(experts)

    def _fill(self, experts: list[int]) -> None:
        holders, items, cap, wload, lload = self.holders, self.items, self.cap, self.wload, self.lload
        # One heap of workers with room per layer, keyed (load in the layer, load in all, experts held, id).
        # A worker's load in all grows as other layers fill: a popped key that is out of date goes back
        # updated (keys only grow, so the first up-to-date key popped is the least).  Within one layer's
        # experts nothing goes out of date.
        heaps: dict[int, list[tuple[float, float, int, int]]] = {}

        def key(l: int, j: int) -> tuple[float, float, int, int]:
            return lload[l][j], wload[j], len(items[j]), j

        for i in experts:
            l, hs, back = self.layer[i], holders[i], []
            if l not in heaps:
                heaps[l] = [key(l, j) for j in range(len(cap)) if len(items[j]) < cap[j]]
                heapq.heapify(heaps[l])
            heap = heaps[l]
            while len(hs) < self.counts[i] and heap:
                entry = heapq.heappop(heap)
                j = entry[3]
                if len(items[j]) >= cap[j]:
                    continue  # full: for good (fill only adds)
                if entry != key(l, j):
                    heapq.heappush(heap, key(l, j))
                    continue
                if j in hs:
                    back.append(entry)
                    continue
                self._add(i, j)
                if len(items[j]) < cap[j]:
                    back.append(key(l, j))
            for entry in back:
                heapq.heappush(heap, entry)
            if len(hs) < self.counts[i]:  # rare: every worker with a free slot holds i
                while len(hs) < self.counts[i]:
                    self._make_room(i)
                heaps.clear()  # loads changed along the way

    def _make_room(self, i: int) -> None:
        """Add one replica of i when no free slot is directly usable: along an augmenting
        path if one exists, else by giving up one of i's extras or another expert's extra."""
        if self._augment(i):
            return
        if self.counts[i] > self.lo:
            self._recount(i, self.counts[i] - 1)
            return
        # Extras can make counts infeasible (Gale-Ryser) though min_replicas alone fits:
        # free a slot held by another expert's extra, then search again.
        for f, hs in enumerate(self.holders):
            if f != i and len(hs) > self.lo:
                j = next((j for j in hs if j not in self.holders[i]), hs[-1])
                self._remove(f, j)
                self._recount(f, self.counts[f] - 1)
                return
        raise PlacementError(f"no room for a replica of expert #{i}: add capacity or workers")  # _check forbids

    def _augment(self, i: int) -> bool:
        """BFS over workers for a chain of moves ending at a free slot, then place i at its
        root: worker a -> b when a holds some expert f that b lacks (each f used once)."""
        holders, items, cap = self.holders, self.items, self.cap
        nw = len(cap)
        parent: dict[int, tuple[int, int] | None] = {j: None for j in range(nw) if j not in holders[i]}
        queue, used = deque(parent), set()
        while queue:
            a = queue.popleft()
            if len(items[a]) < cap[a]:
                while parent[a] is not None:
                    b, f = parent[a]
                    self._shift(f, b, a)
                    a = b
                self._add(i, a)
                return True
            for f in sorted(items[a]):
                if f in used:
                    continue
                used.add(f)
                for b in range(nw):
                    if b not in parent and b not in holders[f]:
                        parent[b] = (a, f)
                        queue.append(b)
        return False

    def polish(self) -> None:
        """Move (or swap) replicas while a worker is outside a band: first each layer's, then the whole
        load's, never pushing a layer a move touches further over its band.  A layer move cuts that layer's
        band violation, a whole-load move cuts the whole-load one and raises no layer's: so this ends."""
        mean = sum(self.share)
        if mean <= 0:
            return
        budget = MAX_POLISH_MOVES
        while budget > 0:
            moved = 0
            for l, s in enumerate(self.share):
                if s > 0:
                    moved += self._balance(l, 0.0, (1 + LAYER_TOLERANCE) * s, LAYER_MIN_GAIN * s, budget - moved)
            moved += self._balance(None, (1 - TOLERANCE) * mean, (1 + TOLERANCE) * mean, MIN_GAIN * mean, budget - moved)
            budget -= moved
            if not moved:
                return

    def _balance(self, layer: int | None, lo: float, hi: float, eps: float, budget: int) -> int:
        """Moves made (at most `budget`) to bring each worker's load in `layer` (None: in all) into [lo, hi],
        each cutting the band violation by at least `eps` per copy."""
        level = self.wload if layer is None else self.lload[layer]
        nw, made = len(self.cap), 0
        while made < budget:
            order = sorted(range(nw), key=level.__getitem__)
            if level[order[-1]] <= hi and level[order[0]] >= lo:
                break
            takers = order[:PARTNERS]
            if not any(self._improve(u, takers, layer, lo, hi, eps) for u in order[:-PARTNERS - 1:-1]):
                break
            made += 1
        return made

    def _improve(self, u: int, takers: list[int], layer: int | None, lo: float, hi: float, eps: float) -> bool:
        """Apply the transfer from u to one of `takers` (a move, or a swap into a full taker) that most
        lowers the band violation of `layer` (None: of the whole load) per copy; False if none lowers it by
        eps.  A swap partner of another layer leaves this layer's load on the taker as it was."""
        per, holders, viol = self.per, self.holders, _violation(lo, hi)
        level = self.wload if layer is None else self.lload[layer]
        gives = self.items if layer is None else self.layer_items[layer]
        best, pick = (0.0,), None
        for v in takers:
            gap = level[u] - level[v]
            if gap <= 0:
                break
            vu, vv = viol(level[u]), viol(level[v])
            # Pushing an in-band worker out counts double: the cascade it starts costs copies.
            wu, wv = (1.0 if vu else 2.0), (1.0 if vv else 2.0)
            give = [f for f in gives[u] if v not in holders[f]]
            if len(self.items[v]) < self.cap[v]:
                options = [(per[f], f, -1) for f in give]
            else:  # swap: for each f, the g's whose exchange comes nearest to halving the gap
                take = sorted((per[g], g) for g in gives[v] if u not in holders[g])
                options = []
                for f in give:
                    k = bisect.bisect(take, (per[f] - gap / 2, -1))
                    options += [(per[f] - pg, f, g) for pg, g in take[max(0, k - 1): k + 1]]
                if layer is not None:  # the lightest partners of other layers: they change this one by f alone
                    other = sorted((per[g], g) for g in self.items[v] if self.layer[g] != layer and u not in holders[g])
                    options += [(per[f], f, g) for f in give for _, g in other[:PARTNERS]]
            for x, f, g in options:
                if not 0 < x < gap:
                    continue
                a, b = viol(level[u] - x), viol(level[v] + x)
                copies = 1 if g < 0 else 2
                if vu + vv - a - b >= eps * copies and self._layers_hold(u, v, f, g):
                    # On a tie, the taker with the least load in all: in a layer, the new worker of a scale-up.
                    score = ((wu * a + wv * b - vu - vv) / copies, abs(x - gap / 2), self.wload[v], v, f, g)
                    if score < best:
                        best, pick = score, (v, f, g)
        if pick is None:
            return False
        v, f, g = pick
        self._shift(f, u, v)
        if g >= 0:
            self._shift(g, v, u)
        return True

    def _layers_hold(self, u: int, v: int, f: int, g: int) -> bool:
        """True if moving f from u to v (and g back from v to u) leaves each layer it touches no further
        over its band on u and v together."""
        change: dict[int, float] = {self.layer[f]: self.per[f]}
        if g >= 0:
            change[self.layer[g]] = change.get(self.layer[g], 0.0) - self.per[g]
        for l, x in change.items():
            lu, lv, over = self.lload[l][u], self.lload[l][v], self.over[l]
            if over(lu - x) + over(lv + x) > over(lu) + over(lv) + 1e-12 * self.share[l]:
                return False
        return True
