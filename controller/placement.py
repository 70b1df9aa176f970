"""Load- and migration-aware expert placement: which workers hold which experts.

Why: a MoE layer is as slow as its busiest worker, and routing is skewed (roughly Zipf), so
hot experts get extra replicas and the frontend splits their load over them, as DeepSeek's
EPLB does.  Unlike EPLB we also pay for migration: every new replica is a copy of an
expert's weights over the network (~350 MB for Mixtral in bf16).  The controller re-plans
whenever load shifts or workers come and go, so `place` keeps every current replica it can
and moves only what liveness, capacity or balance demand.

A plan is made in four steps:

1. counts: every expert gets `min_replicas`; spare slots go one at a time (a heap) to the
   expert with the highest load per replica, until no replica carries more than SPREAD of a
   worker's mean load (with 10+ experts per worker, equal loads get no extras).  A reserve
   of free slots (one per worker, at most a quarter of the spare) lets later moves and a
   dead worker's experts land without swaps; re-plans spend it rather than drop live extras.
2. keep: current replicas on live workers stay, up to the new counts and capacities.
3. fill: missing replicas, heaviest first, go to the least-loaded worker with a free slot
   that lacks the expert (LPT); if none qualifies, an augmenting path shifts other replicas.
4. polish: a bounded local search moves (or swaps) replicas from the busiest to the idlest
   workers while any worker is outside TOLERANCE of the mean load, and only when a copy
   buys at least MIN_GAIN of balance.

`place` is pure and deterministic (ties broken by worker id and expert position), and costs
O(replicas * log(workers)) plus the bounded polish.
"""

from __future__ import annotations

import bisect
import heapq
import math
import numbers
from collections import deque
from collections.abc import Collection, Mapping, Sequence

Key = tuple[int, int]
Placement = dict[Key, tuple[str, ...]]

SPREAD = 0.1  # replicate until each replica carries <= 10% of a mean worker's load
TOLERANCE = 0.05  # polish leaves a worker alone within +-5% of the mean load
HYSTERESIS = 0.25  # an existing extra replica wins ties by 25%: load noise must not churn copies
MIN_GAIN = 0.01  # a copy must cut band violation by >= 1% of the mean load to be worth it
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

    wid = {w: j for j, w in enumerate(workers)}
    cur: list[list[int]] = [[] for _ in range(n)]
    for k, hs in (current or {}).items():
        i = index.get(k)
        if i is not None:
            for w in hs:
                j = wid.get(w)
                if j is not None and j not in cur[i]:
                    cur[i].append(j)

    mean = sum(loads) / nw
    spare = sum(cap) - n * min_replicas
    # Keep a reserve of free slots for later moves, but spend it rather than drop live
    # extras: after a worker dies, its experts land in the reserve and nothing else moves.
    live_extras = sum(max(0, min(len(c), top) - min_replicas) for c in cur)
    budget = min(spare, max(spare - min(nw, spare // 4), live_extras))
    counts = _counts(loads, [len(c) for c in cur], min_replicas, top, budget, SPREAD * mean)
    plan = _Plan(loads, counts, cap, min_replicas)
    plan.keep(cur)
    plan.fill()
    plan.polish(mean)
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
    """Max / mean per-worker load (>= 1.0): each expert's load (missing -> 1.0) split evenly
    over its replicas; `workers` holding nothing count with 0, as do any named only in placement."""
    per = dict.fromkeys(workers, 0.0)
    for key, hs in placement.items():
        if hs:
            share = (1.0 if load is None else load.get(key, 1.0)) / len(hs)
            for w in hs:
                per[w] = per.get(w, 0.0) + share
    total = sum(per.values())
    return max(per.values()) * len(per) / total if total > 0 else 1.0


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


def _counts(loads: list[float], held: list[int], lo: int, hi: int, budget: int, floor: float) -> list[int]:
    """Replicas per expert: lo each, then up to `budget` extras, each to the expert whose
    replicas carry the most load, while that exceeds `floor` and the expert is below hi."""
    counts, boost = [lo] * len(loads), 1.0 + HYSTERESIS
    # Min-heap of (-priority, expert): load per replica, boosted for a replica that exists.
    heap = [(-x / lo * (boost if held[i] > lo else 1.0), i) for i, x in enumerate(loads) if x > 0 and lo < hi]
    heapq.heapify(heap)
    while budget > 0 and heap and -heap[0][0] > floor:
        i = heapq.heappop(heap)[1]
        counts[i] = c = counts[i] + 1
        budget -= 1
        if c < hi:
            heapq.heappush(heap, (-loads[i] / c * (boost if held[i] > c else 1.0), i))
    return counts


class _Plan:
    """Mutable state of one plan; experts and workers are list indices."""

    def __init__(self, loads: list[float], counts: list[int], cap: list[int], lo: int):
        self.loads, self.counts, self.cap, self.lo = loads, counts, cap, lo
        self.per = [x / c for x, c in zip(loads, counts)]  # load of one replica
        self.holders: list[list[int]] = [[] for _ in loads]
        self.items: list[set[int]] = [set() for _ in cap]
        self.wload = [0.0] * len(cap)

    def _add(self, i: int, j: int) -> None:
        self.holders[i].append(j)
        self.items[j].add(i)
        self.wload[j] += self.per[i]

    def _remove(self, i: int, j: int) -> None:
        self.holders[i].remove(j)
        self.items[j].discard(i)
        self.wload[j] -= self.per[i]

    def _shift(self, i: int, src: int, dst: int) -> None:
        """Move expert i's replica from src to dst, keeping its position among the replicas."""
        hs = self.holders[i]
        hs[hs.index(src)] = dst
        self.items[src].discard(i)
        self.items[dst].add(i)
        self.wload[src] -= self.per[i]
        self.wload[dst] += self.per[i]

    def _recount(self, i: int, c: int) -> None:
        """Set expert i's replica count to c (an extra is given up), re-splitting its load."""
        old, self.counts[i] = self.per[i], c
        self.per[i] = self.loads[i] / c
        for j in self.holders[i]:
            self.wload[j] += self.per[i] - old

    def keep(self, cur: list[list[int]]) -> None:
        """Keep current live replicas: surplus copies leave the busiest holders, and a
        worker over capacity sheds its heaviest replicas (fill re-places them)."""
        surplus = []
        for i, hs in enumerate(cur):
            if len(hs) <= self.counts[i]:
                for j in hs:
                    self._add(i, j)
            else:
                surplus.append(i)
        for i in surplus:
            stay = set(sorted(cur[i], key=lambda j: (self.wload[j], j))[: self.counts[i]])
            for j in cur[i]:
                if j in stay:
                    self._add(i, j)
        for j, its in enumerate(self.items):
            if len(its) > self.cap[j]:
                for i in sorted(its, key=lambda i: (-self.per[i], i))[: len(its) - self.cap[j]]:
                    self._remove(i, j)

    def fill(self) -> None:
        """Place missing replicas, heaviest first, each on the least-loaded eligible worker."""
        holders, items, cap, wload = self.holders, self.items, self.cap, self.wload
        todo = sorted((i for i in range(len(holders)) if len(holders[i]) < self.counts[i]),
                      key=lambda i: (-self.per[i], i))
        heap = [(wload[j], len(items[j]), j) for j in range(len(cap)) if len(items[j]) < cap[j]]
        heapq.heapify(heap)
        for i in todo:
            hs, p, back = holders[i], self.per[i], []
            while len(hs) < self.counts[i] and heap:
                entry = heapq.heappop(heap)
                j = entry[2]
                if j in hs:
                    back.append(entry)
                    continue
                hs.append(j)
                items[j].add(i)
                wload[j] += p
                if len(items[j]) < cap[j]:
                    back.append((wload[j], len(items[j]), j))
            for entry in back:
                heapq.heappush(heap, entry)
            if len(hs) < self.counts[i]:  # rare: every worker with a free slot holds i
                while len(hs) < self.counts[i]:
                    self._make_room(i)
                heap = [(wload[j], len(items[j]), j) for j in range(len(cap)) if len(items[j]) < cap[j]]
                heapq.heapify(heap)  # loads changed along the way

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

    def polish(self, mean: float) -> None:
        """Move (or swap) replicas off the busiest workers while any is outside the band."""
        if mean <= 0:
            return
        wload, nw = self.wload, len(self.cap)
        hi, lo = (1 + TOLERANCE) * mean, (1 - TOLERANCE) * mean
        for _ in range(MAX_POLISH_MOVES):
            order = sorted(range(nw), key=wload.__getitem__)
            if wload[order[-1]] <= hi and wload[order[0]] >= lo:
                return
            takers = order[:PARTNERS]
            if not any(self._improve(u, takers, lo, hi) for u in order[:-PARTNERS - 1:-1]):
                return

    def _improve(self, u: int, takers: list[int], lo: float, hi: float) -> bool:
        """Apply the transfer from u to one of `takers` (a move, or a swap into a full taker)
        that most lowers the band violation per copy; False if none lowers it by MIN_GAIN."""
        wl, per, holders = self.wload, self.per, self.holders

        def viol(x: float) -> float:
            return x - hi if x > hi else (lo - x if x < lo else 0.0)

        best, pick, eps = (0.0,), None, MIN_GAIN * (hi + lo) / 2
        for v in takers:
            gap = wl[u] - wl[v]
            if gap <= 0:
                break
            vu, vv = viol(wl[u]), viol(wl[v])
            # Pushing an in-band worker out counts double: the cascade it starts costs copies.
            wu, wv = (1.0 if vu else 2.0), (1.0 if vv else 2.0)
            give = [f for f in self.items[u] if v not in holders[f]]
            if len(self.items[v]) < self.cap[v]:
                options = [(per[f], f, -1) for f in give]
            else:  # swap: for each f, the g's whose exchange comes nearest to halving the gap
                take = sorted((per[g], g) for g in self.items[v] if u not in holders[g])
                options = []
                for f in give:
                    k = bisect.bisect(take, (per[f] - gap / 2, -1))
                    options += [(per[f] - pg, f, g) for pg, g in take[max(0, k - 1): k + 1]]
            for x, f, g in options:
                if not 0 < x < gap:
                    continue
                a, b = viol(wl[u] - x), viol(wl[v] + x)
                copies = 1 if g < 0 else 2
                if vu + vv - a - b >= eps * copies:  # worth the copies; also ensures termination
                    score = ((wu * a + wv * b - vu - vv) / copies, abs(x - gap / 2), v, f, g)
                    if score < best:
                        best, pick = score, (v, f, g)
        if pick is None:
            return False
        v, f, g = pick
        self._shift(f, u, v)
        if g >= 0:
            self._shift(g, v, u)
        return True
