"""Concurrent generations through a whole local cluster: decoded together vs each alone.

    python bench/generation.py [--clients 1 4 16] [--new-tokens 16] [--seconds 6] [--rounds 2] [--sample] [--stream]

`moectl up` starts a cluster (2 workers) whose frontend decodes Generate requests in one running
batch (the default); `--sample`: sampled requests (temperature 0.8, top_k 40, the prompt's number as
seed) instead of greedy ones; `--stream`: through GenerateStream, also timing each request's first
token. A second frontend on the same controller and workers decodes each
request alone (`--generate-cache-tokens 0`). N clients in a closed loop each ask for `--new-tokens`
tokens after a prompt of 4..12 tokens, on one frontend at a time, the two alternating for `--rounds`
rounds. Prints generated tokens/s, p50/p99 request latency and the ratio together / alone, whether
both frontends answer every prompt with the same tokens, and the prompts whose batched tokens differ
from transformers' own `generate` (with whether its full forward of the prefix agrees with the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from moecluster import Client  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def moectl(env, *args) -> str:
    return subprocess.run([sys.executable, "-m", "moecluster.cli.moectl", *args], env=env, check=True,
                          capture_output=True, text=True).stdout


def start_frontend(model: Path, controller: str, run: Path, extra: list[str], name: str = "alone"
                   ) -> tuple[subprocess.Popen, str]:
    """A frontend process of its own on the cluster's controller (`extra`: its flags; a later flag wins)."""
    ready = run / f"frontend-{name}.ready"
    proc = subprocess.Popen([sys.executable, "-m", "moecluster.frontend.server", "--checkpoint", str(model),
                             "--controller", controller, "--ready-file", str(ready), "--metrics-port", "-1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the frontend {name!r} did not start")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["address"]


SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 40}


def closed_loop(address: str, clients: int, seconds: float, prompts, new_tokens: int, answers: dict,
                sample: bool = False, stream: bool = False) -> dict:
    latencies, firsts, errors = [], [], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(n: int):
        c, i = Client(address, timeout=120), n
        while time.monotonic() < stop:
            prompt = prompts[i % len(prompts)]
            sampling = {**SAMPLING, "seed": i % len(prompts)} if sample else {}
            start = time.perf_counter()
            first = None
            try:
                if stream:
                    out = []
                    for _, tokens in c.generate_stream(torch.tensor([prompt]), max_new_tokens=new_tokens, **sampling):
                        first = first or time.perf_counter() - start
                        out += tokens
                else:
                    out = c.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, **sampling)[0, len(prompt):]
                    out = out.tolist()
            except Exception as err:  # noqa: BLE001 - counted
                with lock:
                    errors.append(repr(err))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                firsts.extend([first] if first else [])
                answers.setdefault(i % len(prompts), set()).add(tuple(out))
            i += clients

    with futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return {"latencies": latencies, "firsts": firsts, "errors": errors}


def against_transformers(reference, prompts, answered: dict, new_tokens: int, sample: bool) -> list[tuple]:
    """Prompts whose batched tokens differ from transformers' `generate` of that prompt alone (sampled: under
    `torch.manual_seed` of its seed), each with the first differing position and whether transformers' full
    forward of the prefix picks the batched token (greedy only: a sampled token is not the top one)."""
    differ = []
    for i, outs in sorted(answered.items()):
        prompt = torch.tensor([prompts[i]])
        settings = dict(SAMPLING) if sample else {"do_sample": False}
        torch.manual_seed(i)
        with torch.no_grad():
            theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, pad_token_id=0, **settings)[0, prompt.shape[1]:]
        for ours in outs:
            if list(ours) != theirs.tolist():
                at = next(k for k in range(new_tokens) if ours[k] != theirs[k])
                prefix = torch.tensor([prompts[i] + list(ours[:at])])
                with torch.no_grad():
                    picked = int(reference(input_ids=prefix).logits[0, -1].argmax())
                differ.append((i, at, ours[at], int(theirs[at]), picked == ours[at]))
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="per client count, frontend and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample", action="store_true", help="sampled requests instead of greedy ones")
    parser.add_argument("--stream", action="store_true", help="through GenerateStream, timing the first token too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moecluster-bench-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MOECLUSTER_HOME": str(tmp / "home"), "TRANSFORMERS_VERBOSITY": "error"}
        model = tmp / "model"
        moectl(env, "model", "create", "--family", "qwen3_moe", "--out", str(model), "--layers", "2", "--hidden", "1024",
               "--intermediate", "384", "--experts", "64", "--top-k", "8", "--vocab", "512")
        moectl(env, "up", "--model", str(model), "--workers", "2", "--port", "0", "--detach", "--name", "bench")
        second = None
        try:
            status = json.loads(moectl(env, "status", "--name", "bench", "-o", "json"))
            second, alone_address = start_frontend(model, status["controller"], tmp, ["--generate-cache-tokens", "0"])
            addresses = {"together": status["endpoint"], "alone": alone_address}
            gen = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, 512, (4 + i % 9,), generator=gen).tolist() for i in range(64)]
            for address in addresses.values():  # warm both
                closed_loop(address, 2, 1.0, prompts, 2, {}, args.sample, args.stream)
            results, answers = {}, {}
            for _ in range(args.rounds):
                for clients in args.clients:
                    for name, address in addresses.items():
                        run = closed_loop(address, clients, args.seconds, prompts, args.new_tokens,
                                          answers.setdefault(name, {}), args.sample, args.stream)
                        row = results.setdefault((name, clients), {"latencies": [], "firsts": [], "errors": [],
                                                                   "seconds": 0.0})
                        row["latencies"] += run["latencies"]
                        row["firsts"] += run["firsts"]
                        row["errors"] += run["errors"]
                        row["seconds"] += args.seconds
        finally:
            if second is not None:
                second.terminate()
                second.wait(timeout=30)
            moectl(env, "down", "--name", "bench")

        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        near_ties = against_transformers(reference, prompts, answers["together"], args.new_tokens, args.sample)
    both = set(answers["together"]) & set(answers["alone"])
    differing = [p for p in both if answers["together"][p] != answers["alone"][p] or len(answers["together"][p]) != 1]
    kind = (f"sampled ({SAMPLING})" if args.sample else "greedy") + (", streamed" if args.stream else "")
    print(f"a local cluster, 2 workers: qwen3_moe H=1024, I=384, E=64, top-8, 2 layers; {args.new_tokens} {kind} tokens "
          f"a request; {args.rounds} x {args.seconds:.0f} s per row, the two frontends alternating")
    first = f" {'first p50 ms':>12}" if args.stream else ""
    print(f"{'clients':>7} {'frontend':>9} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} {'vs alone':>8}{first}")
    for clients in args.clients:
        rates = {}
        for name in ("alone", "together"):
            row = results[(name, clients)]
            lat = sorted(row["latencies"])
            rates[name] = len(lat) * args.new_tokens / row["seconds"]
            p50, p99 = statistics.median(lat) * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
            first = f" {statistics.median(row['firsts']) * 1e3:>12.0f}" if args.stream else ""
            print(f"{clients:>7} {name:>9} {rates[name]:>9.1f} {p50:>8.0f} {p99:>8.0f} {len(row['errors']):>6} "
                  f"{rates[name] / rates['alone']:>7.2f}x{first}")
    print(f"prompts answered by both: {len(both)}; answered differently (or inconsistently): {len(differing)}")
    print(f"decoded together vs transformers' generate of each prompt alone: {len(near_ties)} of "
          f"{len(answers['together'])} prompts differ")
    for prompt, position, ours, theirs, agrees in near_ties:
        if args.sample:
            print(f"  prompt {prompt}, new token {position}: {ours} here, {theirs} by generate")
            continue
        print(f"  prompt {prompt}, new token {position}: {ours} here, {theirs} by generate; transformers' full forward "
              f"of the prefix picks {'ours' if agrees else 'neither'} (a router near-tie: rounding flips an expert)")


if __name__ == "__main__":
    main()
