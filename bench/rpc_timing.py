"""What a server's per-RPC machinery costs: the latency interceptor, a frontend's API-key check and TLS,
each against the same server without it.

    python bench/rpc_timing.py [--calls 3000] [--rounds 3] [--clients 1 8]

The worst case for each: an RPC that does nothing (echoes 64 bytes), so the server's time is
all gRPC's and the machinery's own. The servers run on loopback in a process of their own:
untimed; timed (`observability/rpc_latency.py`, as every worker and frontend runs); timed with
an API key checked (`wire/access.py`, a frontend with --api-keys); the same with the key's calls counted
and rate-limited (a rate never reached: the bucket's cost, `wire/rate_limits.py`); timed over TLS (--tls-cert);
timed over TLS with a key; and untimed again (measured as if it were another, it says how far
apart two alike servers measure: the noise floor). Here N client threads each make `--calls`
sequential calls, the servers taking turns for `--rounds` rounds so that drift hits all alike.
Prints calls/s and each server's ratio to the untimed one, and the microseconds a call gained:
set that against a worker's or frontend's Forward (milliseconds).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import threading
import time

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
from moecluster.observability.rpc_latency import RpcLatency  # noqa: E402
from moecluster.wire import access, endpoints  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tls_files import make_ca  # noqa: E402

SERVERS = ("untimed", "timed", "timed + key", "timed + key + rate", "timed + TLS", "timed + TLS + key", "untimed again")
KEY = "bench-key"


def echo_server(name: str, files: Path) -> tuple[grpc.Server, str, RpcLatency | None]:
    latency = RpcLatency("bench_rpc_seconds") if name.startswith("timed") else None
    keys = files / ("keys-rated" if name.endswith("rate") else "keys")
    guard = [access.RequireApiKey(access.ApiKeys(keys))] if "key" in name else []
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = endpoints.server(16, handlers=[handler], interceptors=[latency, *guard] if latency else [])
    tls = (files / "server.crt", files / "server.key") if "TLS" in name else None
    port = access.add_port(server, "127.0.0.1:0", tls)
    server.start()
    return server, f"127.0.0.1:{port}", latency


def make_files() -> Path:
    files = Path(tempfile.mkdtemp(prefix="rpc-timing-"))
    (files / "keys").write_text(f"{KEY}\n")
    (files / "keys-rated").write_text(f"{KEY} name=bench requests-per-second=1e9\n")  # counted, never refused
    make_ca(files, "ca").issue(files, "server", ["localhost"])
    return files


def calls_per_second(name: str, address: str, clients: int, calls: int, files: Path) -> float:
    payload = b"x" * 64
    credentials = access.channel_credentials(files / "ca.pem") if "TLS" in name else None
    channels = [endpoints.channel(address, credentials=credentials, options=[("grpc.ssl_target_name_override",
                                                                              "localhost")]) for _ in range(clients)]
    metadata = [("authorization", f"Bearer {KEY}")] if "key" in name else None
    stubs = [functools.partial(c.unary_unary("/bench.Echo/Echo"), metadata=metadata) for c in channels]
    for stub in stubs:
        stub(payload, timeout=10)  # connected before the clock starts
    start = threading.Barrier(clients + 1)

    def client(stub):
        start.wait()
        for _ in range(calls):
            stub(payload, timeout=10)

    threads = [threading.Thread(target=client, args=(s,)) for s in stubs]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    for c in channels:
        c.close()
    return clients * calls / elapsed


def serve(files: Path) -> None:
    """The servers' process: prints their addresses, answers `count` on stdin with the timed ones' counts."""
    servers = {name: echo_server(name, files) for name in SERVERS}
    print(*(servers[name][1] for name in SERVERS), flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            print(*(latency.histogram.count(method="Echo", code="OK") for _, _, latency in servers.values() if latency),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="sequential calls per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    files = make_files()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(files)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        addresses = dict(zip(SERVERS, child.stdout.readline().split()))
        print(f"{'clients':>7} {'server':>18} {'calls/s':>9} {'ratio':>6} {'us/call added':>14}")
        for clients in args.clients:
            rates = {name: [] for name in SERVERS}
            for _ in range(args.rounds):
                for name, address in addresses.items():
                    rates[name].append(calls_per_second(name, address, clients, args.calls, files))
            plain = sum(rates["untimed"]) / args.rounds
            for name in SERVERS:
                rate = sum(rates[name]) / args.rounds
                added_us = (1 / rate - 1 / plain) * clients * 1e6  # per call, as one client sees it
                print(f"{clients:>7} {name:>18} {rate:>9,.0f} {rate / plain:>5.2f}x {added_us:>14.1f}")
        child.stdin.write("count\n")
        child.stdin.flush()
        counted = [int(n) for n in child.stdout.readline().split()]
        expected = sum(args.rounds * c * (args.calls + 1) for c in args.clients)
        timed = sum(1 for name in SERVERS if name.startswith("timed"))
        assert counted == [expected] * timed, f"the timed servers counted {counted} calls, expected {expected} each"
        print(f"each timed server counted all {expected} calls as OK")
    finally:
        child.stdin.close()
        child.wait(10)
        shutil.rmtree(files, ignore_errors=True)


if __name__ == "__main__":
    main()
