"""What timing every RPC costs: a gRPC server with the latency interceptor vs the same server without it.

    python bench/rpc_timing.py [--calls 3000] [--rounds 3] [--clients 1 8]

The worst case for the interceptor: an RPC that does nothing (echoes 64 bytes), so the
server's time is all gRPC's and the interceptor's own. Two servers on loopback in a process
of their own, one timed (`observability/rpc_latency.py`, as every worker and frontend runs),
two not (the second, measured as if it were another, says how far apart two alike servers
measure: the noise floor); here N client threads each make `--calls` sequential calls, the
servers taking turns for `--rounds` rounds so that drift hits all alike. Prints calls/s,
the ratios timed / untimed and untimed again / untimed, and the microseconds a call gained:
set that against a worker's Forward (milliseconds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import grpc  # noqa: E402
from moecluster.observability.rpc_latency import RpcLatency  # noqa: E402
from moecluster.wire import endpoints  # noqa: E402

SERVERS = ("untimed", "timed", "untimed again")


def echo_server(timed: bool) -> tuple[grpc.Server, str, RpcLatency | None]:
    latency = RpcLatency("bench_rpc_seconds") if timed else None
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = endpoints.server(16, handlers=[handler], interceptors=[latency] if latency else [])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", latency


def calls_per_second(address: str, clients: int, calls: int) -> float:
    payload = b"x" * 64
    channels = [grpc.insecure_channel(address) for _ in range(clients)]
    stubs = [c.unary_unary("/bench.Echo/Echo") for c in channels]
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


def serve() -> None:
    """The servers' process: prints their addresses, answers `count` on stdin with the timed one's count."""
    servers = {name: echo_server(name == "timed") for name in SERVERS}
    print(*(servers[name][1] for name in SERVERS), flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            print(servers["timed"][2].histogram.count(method="Echo", code="OK"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="sequential calls per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        addresses = dict(zip(SERVERS, child.stdout.readline().split()))
        print(f"{'clients':>7} {'untimed calls/s':>16} {'timed calls/s':>14} {'ratio':>6} {'us/call added':>14} "
              f"{'untimed again':>14}")
        for clients in args.clients:
            rates = {name: [] for name in SERVERS}
            for _ in range(args.rounds):
                for name, address in addresses.items():
                    rates[name].append(calls_per_second(address, clients, args.calls))
            plain, again, timed = (sum(rates[name]) / args.rounds for name in ("untimed", "untimed again", "timed"))
            added_us = (1 / timed - 1 / plain) * clients * 1e6  # per call, as one client sees it
            print(f"{clients:>7} {plain:>16,.0f} {timed:>14,.0f} {timed / plain:>5.2f}x {added_us:>14.1f} "
                  f"{again / plain:>13.2f}x")
        child.stdin.write("count\n")
        child.stdin.flush()
        counted = int(child.stdout.readline())
        expected = sum(args.rounds * c * (args.calls + 1) for c in args.clients)
        assert counted == expected, f"the timed server counted {counted} calls, expected {expected}"
        print(f"the timed server counted all {counted} calls")
    finally:
        child.stdin.close()
        child.wait(10)


if __name__ == "__main__":
    main()
