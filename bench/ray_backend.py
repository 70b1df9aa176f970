"""Scale-up on the Ray backend vs the local backend, same model, same run.

    python bench/ray_backend.py [--scalings 2]

For each backend: a cluster of 2 workers (replicas 2) on a tiny qwen3_moe
checkpoint, under a closed-loop load of 2 clients whose every answer is checked
against transformers' own forward; then `scale 3` (timed until the new layout
serves) and `scale 2`, `--scalings` times. Prints the median scale-up time of
each backend, their ratio, and the requests answered, failed and wrong.

Ray's servers listen on every interface of their network namespace, so the
benchmark re-runs itself in a namespace with only loopback (`unshare -n`)
unless --no-isolate is given. Bounded: a few minutes; it stops what it starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from moecluster.backends.local import LocalCluster  # noqa: E402
from moecluster.backends.processes import spawn, stop  # noqa: E402
from moecluster.models.tiny import create_checkpoint  # noqa: E402
from moecluster.sdk.load import time_scalings  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def measure(cluster: LocalCluster, batch, logits, scalings: int) -> dict:
    return time_scalings(cluster.status()["endpoint"], batch, logits, lambda n: list(cluster.scale(n)), scalings=scalings)


def run(scalings: int) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    root = Path(tempfile.mkdtemp(prefix="moe-bench-ray-"))
    os.environ["MOECLUSTER_HOME"] = str(root / "home")
    for sub in ("run", "logs"):
        (root / sub).mkdir()
    path = create_checkpoint("qwen3_moe", root / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(batch).logits
    results = {}
    local = LocalCluster("bench-local")
    local.up(path, workers=2, replicas=2, port=0)
    try:
        results["local"] = measure(local, batch, logits, scalings)
    finally:
        local.down()
    head = spawn("ray-head", "moecluster.backends.ray_head", ["--num-cpus", "16"], root / "run", root / "logs", 180)
    try:
        on_ray = LocalCluster("bench-ray")
        on_ray.up(path, workers=2, replicas=2, port=0, backend="ray", ray_address=head.address)
        try:
            results["ray"] = measure(on_ray, batch, logits, scalings)
        finally:
            on_ray.down()
    finally:
        import ray

        ray.shutdown()
        stop(head, 30)
    for name, r in results.items():
        print(f"{name:<6} scale 2 -> 3: median {r['scale_up_s']:.2f} s (each: {', '.join(f'{t:.2f}' for t in r['all'])}); "
              f"{r['ok']} requests answered, {r['failed']} failed, {r['wrong']} wrong")
    print(f"ray / local scale-up time: {results['ray']['scale_up_s'] / results['local']['scale_up_s']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scalings", type=int, default=2)
    parser.add_argument("--no-isolate", action="store_true", help="run in this network namespace (Ray listens on "
                        "every interface)")
    args = parser.parse_args()
    if not args.no_isolate:
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
               os.path.abspath(__file__), "--scalings", str(args.scalings), "--no-isolate"]
        sys.exit(subprocess.run(cmd).returncode)
    run(args.scalings)


if __name__ == "__main__":
    main()
