"""Prometheus metrics without a client library: a tiny registry, the text format, a /metrics server.

    registry = Registry()
    tokens = registry.counter("moecluster_worker_tokens_total", "tokens computed", ["layer", "expert"])
    tokens.inc(12, layer=0, expert=3)
    server = serve_metrics(registry.render, port=0)   # GET http://127.0.0.1:PORT/metrics

Processes whose state already lives elsewhere (a worker's Stats, a frontend's
dispatcher) do not count twice: they build a fresh registry from that state on
each scrape (`worker_metrics`, `frontend_metrics`). This file names every
worker and frontend metric; the controller renders its own (controller/metrics.py).

Rates are Prometheus' job: tokens/s per expert is
`rate(moecluster_worker_tokens_total[1m])`, summed over workers by (layer, expert).
"""

from __future__ import annotations

import bisect
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


# -- the registry -----------------------------------------------------------------


# Request latencies, seconds: a CPU decode step's few ms up to a long generation's minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _checked(name: str, labels: Iterable[str], reserved: tuple[str, ...] = ()) -> tuple[str, ...]:
    labels = tuple(labels)
    if not _NAME.match(name):
        raise ValueError(f"metric name {name!r} is not [a-zA-Z_:][a-zA-Z0-9_:]*")
    bad = [l for l in labels if not _LABEL.match(l) or l.startswith("__") or l in reserved]
    if bad or len(set(labels)) != len(labels):
        raise ValueError(f"metric {name}: bad or repeated label names {labels}")
    return labels


def _label_key(name: str, names: tuple[str, ...], labels: Mapping[str, object]) -> tuple[str, ...]:
    if set(labels) != set(names):
        raise ValueError(f"metric {name} takes labels {list(names)}, got {sorted(labels)}")
    return tuple(str(labels[l]) for l in names)


class Metric:
    """One metric family: a value per label set. Thread-safe."""

    def __init__(self, name: str, kind: str, help: str = "", labels: Iterable[str] = ()):
        labels = _checked(name, labels)
        self.name, self.kind, self.help, self.labels = name, kind, help, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> tuple[str, ...]:
        return _label_key(self.name, self.labels, labels)

    def inc(self, amount: float = 1, **labels) -> None:
        if self.kind == "counter" and amount < 0:
            raise ValueError(f"counter {self.name} cannot go down (inc by {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def set(self, value: float, **labels) -> None:
        """Sets a gauge; on a counter, publishes a total counted elsewhere (it must not go down)."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def get(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def render(self) -> list[str]:
        lines = []
        if self.help:
            lines.append(f"# HELP {self.name} {_escape_help(self.help)}")
        lines.append(f"# TYPE {self.name} {self.kind}")
        with self._lock:
            values = sorted(self._values.items())
        if not self.labels and not values:
            values = [((), 0)]  # an unlabelled metric is always there, 0 until it moves
        for key, value in values:
            lines.append(f"{self.name}{label_set(zip(self.labels, key))} {format_value(value)}")
        return lines


class Histogram:
    """One histogram family: per label set, how many observations fell at or under each bucket's bound, their
    sum and their count (quantiles are Prometheus' `histogram_quantile`). Long-lived, so a registry built per
    scrape takes it with `add`.

    Thread-safe without a lock on the way in: each thread counts into rows of its own, summed when read. A
    lock there cost a server timing every RPC several % of its calls/s at saturation (bench/rpc_timing.py),
    its threads queueing on it and handing the GIL round."""

    kind = "histogram"

    def __init__(self, name: str, help: str = "", labels: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS):
        self.labels = _checked(name, labels, reserved=("le",))
        self.name, self.help = name, help
        self.bounds = tuple(float(b) for b in buckets)
        if not self.bounds or any(not math.isfinite(b) for b in self.bounds) or list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"histogram {name}: buckets must be finite and increasing, got {self.bounds}")
        self._mine = threading.local()  # .rows: this thread's {label key: [count in each bucket alone..., sum]}
        self._threads: list[dict[tuple[str, ...], list[float]]] = []
        self._lock = threading.Lock()  # for `_threads` only: taken once per thread, and to read

    def observe(self, value: float, **labels) -> None:
        key = _label_key(self.name, self.labels, labels)
        rows = getattr(self._mine, "rows", None)
        if rows is None:
            rows = self._mine.rows = {}
            with self._lock:
                self._threads.append(rows)
        row = rows.get(key)
        if row is None:
            row = rows[key] = [0] * (len(self.bounds) + 1) + [0.0]
        row[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value; past them all: +Inf's
        row[-1] += value

    def _merged(self) -> dict[tuple[str, ...], list[float]]:
        with self._lock:
            threads = list(self._threads)
        merged: dict[tuple[str, ...], list[float]] = {}
        for rows in threads:
            for key, row in list(rows.items()):  # one C call: safe beside the thread adding to it
                total = merged.setdefault(key, [0] * len(row))
                for i, value in enumerate(list(row)):
                    total[i] += value
        return merged

    def count(self, **labels) -> int:
        row = self._merged().get(_label_key(self.name, self.labels, labels))
        return int(sum(row[:-1])) if row else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}"] if self.help else []
        lines.append(f"# TYPE {self.name} histogram")
        for key, row in sorted(self._merged().items()):
            pairs = list(zip(self.labels, key))
            below = 0
            for bound, alone in zip((*self.bounds, math.inf), row):
                below += alone
                lines.append(f"{self.name}_bucket{label_set([*pairs, ('le', format_value(bound))])} {int(below)}")
            lines.append(f"{self.name}_sum{label_set(pairs)} {format_value(float(row[-1]))}")
            lines.append(f"{self.name}_count{label_set(pairs)} {int(below)}")  # the +Inf bucket's, always
        return lines


class Registry:
    def __init__(self):
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str = "", labels: Iterable[str] = ()) -> Metric:
        return self._add(Metric(name, "counter", help, labels))

    def gauge(self, name: str, help: str = "", labels: Iterable[str] = ()) -> Metric:
        return self._add(Metric(name, "gauge", help, labels))

    def add(self, metric: Metric | Histogram) -> Metric | Histogram:
        """A metric that lives longer than this registry (a process's histogram), rendered with it."""
        return self._add(metric)

    def _add(self, metric):
        with self._lock:
            old = self._metrics.get(metric.name)
            if old is not None:
                if (old.kind, old.labels) != (metric.kind, metric.labels):
                    raise ValueError(f"metric {metric.name} is already a {old.kind} with labels {old.labels}")
                return old
            self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(line + "\n" for metric in metrics for line in metric.render())


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def label_set(pairs: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
    return f"{{{body}}}" if body else ""


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


# -- reading the format back (tests, tools) ------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?\Z")
_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\[\\"n])*)"\s*(,|\Z)')
_VALUES = {"nan": math.nan, "+inf": math.inf, "inf": math.inf, "-inf": -math.inf}


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Text exposition -> [(name, labels, value)]; ValueError naming the first line that is not the format."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 2 and parts[1] == "TYPE" and (
                    len(parts) != 4 or parts[3] not in ("counter", "gauge", "summary", "histogram", "untyped")
                    or not _NAME.match(parts[2])):
                raise ValueError(f"line {number}: bad TYPE line {line!r}")
            continue
        match = _SAMPLE.match(line)
        if not match:
            raise ValueError(f"line {number}: not `name{{labels}} value`: {line!r}")
        name, body, raw = match.groups()
        labels: dict[str, str] = {}
        pos = 0
        while body and pos < len(body):
            pair = _PAIR.match(body, pos)
            if not pair or pair.group(1) in labels:
                raise ValueError(f"line {number}: bad labels {{{body}}}")
            labels[pair.group(1)] = pair.group(2).replace(r"\n", "\n").replace(r"\"", '"').replace(r"\\", "\\")
            pos = pair.end()
        try:
            value = _VALUES[raw.lower()] if raw.lower() in _VALUES else float(raw)
        except ValueError:
            raise ValueError(f"line {number}: value {raw!r} is not a number") from None
        samples.append((name, labels, value))
    return samples


# -- serving ------------------------------------------------------------------------------


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    @property
    def address(self) -> str:
        """host:port actually bound (the port is the real one when 0 was asked for)."""
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def serve_metrics(render: Callable[[], str], port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serves `render()` on GET /metrics from a daemon thread; port 0 picks a free one (see `.address`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "metrics are on /metrics")
                return
            try:
                body = render().encode()
            except Exception as err:  # noqa: BLE001 - a scrape must not kill the server
                self.send_error(500, f"rendering metrics failed: {type(err).__name__}: {err}")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server_class = MetricsServer
    if ":" in host:
        server_class = type("MetricsServer6", (MetricsServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name=f"metrics-{server.server_address[1]}").start()
    return server


# -- what each process exports --------------------------------------------------------------


def worker_metrics(stats, *, bytes_pulled: int = 0, latency: Histogram | None = None) -> str:
    """A worker's /metrics from its StatsResponse (the numbers ExpertWorkerService keeps).

    `stats` needs worker_id, epoch, draining, held, requests, rejected, forward_batches, batched_requests and experts
    (each with expert.layer, expert.expert, tokens, calls, seconds). An expert's
    counters go back to 0 when the worker drops it (a counter reset to Prometheus). `latency`: the
    server's `moecluster_worker_rpc_seconds` (observability/rpc_latency.py).
    """
    r = Registry()
    r.gauge("moecluster_worker_info", "this worker's id", ["worker"]).set(1, worker=stats.worker_id)
    tokens = r.counter("moecluster_worker_tokens_total", "tokens computed per expert", ["layer", "expert"])
    seconds = r.counter("moecluster_worker_expert_seconds_total",
                        "compute seconds per expert (a call's time shared by token count)", ["layer", "expert"])
    calls = r.counter("moecluster_worker_expert_calls_total", "Forward calls that used the expert", ["layer", "expert"])
    for row in stats.experts:
        key = {"layer": row.expert.layer, "expert": row.expert.expert}
        tokens.set(int(row.tokens), **key)
        seconds.set(float(row.seconds), **key)
        calls.set(int(row.calls), **key)
    r.counter("moecluster_worker_requests_total", "Forward calls answered").set(int(stats.requests))
    r.counter("moecluster_worker_forward_batches_total",
              "kernel calls that computed inference forwards together").set(int(stats.forward_batches))
    r.counter("moecluster_worker_batched_requests_total",
              "inference forwards those calls took, refused ones included (over forward_batches: the mean batch)"
              ).set(int(stats.batched_requests))
    r.counter("moecluster_worker_rejected_total", "requests refused as malformed or stale").set(int(stats.rejected))
    r.counter("moecluster_worker_bytes_pulled_total", "expert bytes copied from peers").set(int(bytes_pulled))
    r.gauge("moecluster_worker_experts_held", "experts held in memory").set(len(stats.held))
    r.gauge("moecluster_worker_epoch", "highest routing epoch seen").set(int(stats.epoch))
    r.gauge("moecluster_worker_draining", "1 once the worker drains").set(int(bool(stats.draining)))
    if latency is not None:
        r.add(latency)
    return r.render()


def rendered(histogram: Histogram) -> str:
    """One histogram's text, to follow another exposition (a controller's own metrics)."""
    registry = Registry()
    registry.add(histogram)
    return registry.render()


def frontend_metrics(*, requests: int, failed: int, retries: int, wire_bytes: int, epoch: int,
                     outstanding: Mapping[str, int], generated_tokens: int = 0, latency: Histogram | None = None,
                     forward_batches: int = 0, batched_forwards: int = 0,
                     client_calls: Mapping[tuple[str, str], int] | None = None,
                     client_tokens: Mapping[str, int] | None = None, first_token: Histogram | None = None,
                     client_limit_parts: Mapping[str, float] | None = None) -> str:
    """A frontend's /metrics: request counters and the dispatcher's state (outstanding: tokens in flight per
    worker); `latency`: the server's `moecluster_frontend_rpc_seconds` (observability/rpc_latency.py);
    `forward_batches` / `batched_forwards`: the forward batcher's forwards and the requests they answered;
    `client_calls`: (key holder's name, admitted | limited) -> calls, where the frontend asks for API keys, and
    `client_tokens`: holder -> tokens computed for them; `client_limit_parts`: holder -> this frontend's part of
    their limits (controller/limit_shares.py);
    `first_token`: how long streamed generations took to their first tokens."""
    r = Registry()
    r.counter("moecluster_frontend_requests_total", "Forward and Generate requests").set(int(requests))
    r.counter("moecluster_frontend_generated_tokens_total",
              "new tokens Generate answered, of all rows (its rate: tokens/s)").set(int(generated_tokens))
    r.counter("moecluster_frontend_failed_total", "requests failed for want of a live expert replica").set(int(failed))
    r.counter("moecluster_frontend_forward_batches_total",
              "forwards of the model that computed Forward requests together").set(int(forward_batches))
    r.counter("moecluster_frontend_batched_forwards_total",
              "Forward requests those forwards answered (over forward_batches: the mean batch)").set(int(batched_forwards))
    r.counter("moecluster_frontend_dispatch_retries_total",
              "worker shares sent again to another replica").set(int(retries))
    r.counter("moecluster_frontend_wire_bytes_total", "serialized bytes to and from workers").set(int(wire_bytes))
    r.gauge("moecluster_frontend_epoch", "routing table epoch in use").set(int(epoch))
    r.gauge("moecluster_frontend_workers", "workers routed to (the table's, and any still owing answers)").set(
        len(outstanding))
    load = r.gauge("moecluster_frontend_outstanding_tokens", "tokens in flight per worker (its load from here)",
                   ["worker"])
    for worker_id, tokens in sorted(outstanding.items()):
        load.set(int(tokens), worker=worker_id)
    if client_calls is not None:
        calls = r.counter("moecluster_frontend_client_calls_total", "calls by the holder of each API key: admitted, "
                          "or refused for being over its requests-per-second", ["client", "outcome"])
        for (client, outcome), count in sorted(client_calls.items()):
            calls.set(int(count), client=client, outcome=outcome)
    if client_tokens is not None:
        tokens = r.counter("moecluster_frontend_client_tokens_total", "tokens computed for the holder of each API "
                           "key: prompts and tokens generated (what tokens-per-minute counts)", ["client"])
        for client, count in sorted(client_tokens.items()):
            tokens.set(int(count), client=client)
    if client_limit_parts is not None:
        parts = r.gauge("moecluster_frontend_client_limit_part", "this frontend's part of each API key holder's "
                        "requests-per-second and tokens-per-minute, as the controller divides them", ["client"])
        for client, part in sorted(client_limit_parts.items()):
            parts.set(float(part), client=client)
    for histogram in (latency, first_token):
        if histogram is not None:
            r.add(histogram)
    return r.render()


__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Histogram", "Metric", "MetricsServer", "Registry", "format_value",
           "frontend_metrics", "parse", "rendered", "serve_metrics", "worker_metrics"]
