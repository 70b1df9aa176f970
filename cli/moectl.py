"""moectl: run and inspect moecluster clusters.

  moectl model create --family qwen3_moe --out ./tiny-qwen3
  moectl up --model ./tiny-qwen3 --workers 3 --port 50051 --detach
  moectl status [-o json]
  moectl scale --workers 5          # returns when the new layout serves
  moectl migrate --layer 0 --expert 3 --to worker-4
  moectl drain worker-1              # the pool shrinks by one
  moectl replace worker-2            # a new worker takes its experts first: the pool keeps its size
  moectl train --steps 30 --out ./run      # train the model through the cluster
  moectl snapshot --dir ./snapshots        # experts' training state, at a step boundary
  moectl train --steps 30 --out ./run --save-every 10     # also the dense model's, every 10 steps
  moectl train --steps 20 --out ./run --resume ./snapshots/step-00000010   # from there on, as if never stopped
  torchrun --nproc-per-node 4 -m moecluster.cli.moectl train --steps 30 --batch 8 --out ./run   # 4 trainers, data parallel
  moectl snapshots; moectl restore ./snapshots   # what a restore or resume can use; every expert back to the newest
  moectl train --controller OPERATOR:50055 --cluster ml/mixtral --model /models/x --out /snapshots/run  # on Kubernetes
  moectl generate 3 1 4 1 5 --max-new-tokens 8 --stream  # token ids in, the cluster's continuation out
  moectl down
  moectl demo            # the whole tour on a tiny model, in one command
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from moecluster.backends.local import ClusterError, LocalCluster, cluster_names
from moecluster.cli import generate
from moecluster.wire import internal_tls


def _progress(message: str) -> None:
    print(f"moectl: {message}", file=sys.stderr, flush=True)


def cmd_model_create(args) -> int:
    from moecluster.models.families import FAMILIES
    from moecluster.models.tiny import create_checkpoint

    if args.family not in FAMILIES:
        raise ClusterError(f"unknown family {args.family!r}; choose one of: {', '.join(sorted(FAMILIES))}")
    out = create_checkpoint(args.family, args.out, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                            experts=args.experts, top_k=args.top_k, vocab=args.vocab, seed=args.seed,
                            max_shard_size=args.shard_size)
    print(f"wrote a {args.family} checkpoint ({args.layers} MoE layers x {args.experts} experts, top-{args.top_k}, "
          f"hidden {args.hidden}) to {out}")
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt  # SIGTERM while starting: `up` stops what it started, then we exit


def cmd_up(args) -> int:
    cluster = LocalCluster(args.name)
    signal.signal(signal.SIGTERM, _interrupt)
    status = cluster.up(args.model, workers=args.workers, replicas=args.replicas, port=args.port,
                        worker_threads=args.worker_threads, capacity=args.capacity, timeout=args.timeout,
                        progress=_progress, snapshot_dir=args.snapshot_dir, snapshot_every_s=args.snapshot_every,
                        snapshot_keep=args.snapshot_keep,
                        backend=args.backend, ray_address=args.address, serve_grpc_port=args.serve_grpc_port,
                        standby=args.standby, worker_device=args.worker_device,
                        frontend_device=args.frontend_device, colocate=args.colocate,
                        rebalance_above=args.rebalance_above, max_replicas=args.max_replicas,
                        rebalance_min_load=args.rebalance_min_load, worker_batch_tokens=args.worker_batch_tokens,
                        worker_compute_threads=args.worker_compute_threads,
                        generate_cache_tokens=args.generate_cache_tokens,
                        forward_batch_tokens=args.forward_batch_tokens, api_keys=args.api_keys,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, internal_tls=args.internal_tls)
    pool = [w for w in status["workers"] if w["state"] != "standby"]
    spares = f" + {args.standby} standby" if args.standby else ""
    print(f"cluster {status['name']!r} serving {args.model} on {status['endpoint']} ({len(pool)} workers{spares}, "
          f"{args.replicas} cop{'y' if args.replicas == 1 else 'ies'} of each expert, epoch {status['epoch']})")
    if args.detach:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"stop it with: moectl down --name {status['name']}")
        return 0
    print("Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    stopped = cluster.down()
    print(f"stopped {len(stopped)} processes")
    return 0


def cmd_resume(args) -> int:
    cluster = LocalCluster(args.name)
    if cluster.controller_running() and (cluster.backend == "ray" or cluster.supervised()):
        raise ClusterError(f"the controller of {args.name!r} is running")
    cluster.start_controller()  # locally, also a supervisor for a controller that runs without one
    status = cluster.wait_converged(args.timeout, _progress)
    print(f"controller of {args.name!r} restarted; {len(status['workers'])} workers at epoch {status['epoch']}")
    return 0


def cmd_status(args) -> int:
    doc = LocalCluster(args.name).status()
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return 0
    state = "converged" if doc["converged"] else "reconciling"
    layers = doc.get("layer_imbalance") or {}
    worst = max(layers, key=layers.get) if layers else None  # the layer that waits longest for a worker
    print(f"cluster {doc['name']}  endpoint {doc['endpoint']}  epoch {doc['epoch']}  "
          f"workers {sum(w['state'] not in ('standby', 'leaving') for w in doc['workers'])}/{doc['desired_workers']}  "
          f"replicas >= {doc['min_replicas']}  imbalance {doc['imbalance']:.2f}"
          + (f" (worst: layer {worst}, {layers[worst]:.2f})" if worst is not None else "") + f"  {state}")
    for w in doc["workers"]:
        print(f"  {w['id']:<10} {w['address']:<22} pid {w['pid']:<8} {w['state']:<10} {len(w['experts']):>4} experts"
              f" on {w.get('device') or '?':<7} {w['load']:>9.1f} tokens/s")
    if doc["colocated"] is not None:
        print(f"  experts picked together that share a worker: {doc['colocated']:.0%} of the pair traffic "
              f"(colocate {'on' if doc['colocate'] else 'off: moectl up --colocate'})")
    if doc["internal_tls"]:
        print(f"  internal mutual TLS; SDK admin calls and trainers: MOECLUSTER_INTERNAL_TLS={doc['internal_tls']}")
    if doc["step"]:
        print(f"  training: step {doc['step']}" + (f", last snapshot {doc['snapshot']}" if doc["snapshot"] else ""))
    if doc["restored"]:
        print(f"  restored: {doc['restored']}")
    if doc["lowest_step"] < doc["step"] and not doc["trainers"]:
        print(f"  experts at steps {doc['lowest_step']}..{doc['step']}: an update was cut off (its trainer stopped "
              "mid-way); `moectl train --resume SNAPSHOT` or `moectl restore` brings them back together")
    for r in doc["rollbacks"]:
        print(f"  rollback: expert ({r['layer']}, {r['expert']}) restored to step {r['snapshot_step']} from {r['source']} "
              f"at step {r['step']}: {r['step'] - r['snapshot_step']} updates lost")
    if not doc["supervised"]:
        print(f"  the controller's supervisor is gone: a controller that dies stays down; "
              f"`moectl resume --name {args.name}` starts one (it adopts this controller)")
    if doc["last_error"]:
        print(f"  last error: {doc['last_error']}")
    return 0


def _follow(lines) -> int:
    for line in lines:
        _progress(line)
    return 0


def cmd_scale(args) -> int:
    cluster = LocalCluster(args.name)
    _follow(cluster.scale(args.workers, timeout=args.timeout))
    status = cluster.status()
    print(f"{len(status['workers'])} workers serving at epoch {status['epoch']}")
    return 0


def cmd_migrate(args) -> int:
    return _follow(LocalCluster(args.name).migrate(args.layer, args.expert, args.to, args.source or "",
                                                   timeout=args.timeout))


def cmd_drain(args) -> int:
    return _follow(LocalCluster(args.name).drain(args.worker, timeout=args.timeout, replace=args.replace))


def cmd_snapshot(args) -> int:
    return _follow(LocalCluster(args.name).snapshot(args.dir, timeout=args.timeout))


def cmd_snapshots(args) -> int:
    from moecluster.cli.snapshot_table import describe
    from moecluster.controller.remote_snapshots import summary

    cluster = LocalCluster(args.name)
    if args.dir:  # a folder this machine sees
        from moecluster.workers.snapshot_folders import manifest_message, newest_first

        root, found = args.dir, [summary(manifest_message(s)) for s in newest_first(args.dir)]
    else:  # as the workers see the cluster's directory (on Ray, another node's disk)
        root = cluster.spec().snapshot_dir
        if not root:
            raise ClusterError(f"cluster {args.name!r} keeps no snapshots (`moectl up --snapshot-dir DIR`); or give --dir")
        doc = cluster.status(list_snapshots=True)
        if not any(w["state"] == "serving" for w in doc["workers"]):
            raise ClusterError(f"no worker of {args.name!r} is serving to list {root} (`--dir` reads a folder here)")
        found = doc["snapshots"]
    if not found:
        print(f"no snapshots in {root}")
    for snap in found:
        print(describe(snap["step"], snap["experts"], snap["bytes"], snap["trainer_state"], snap["path"]))
    return 0


def cmd_restore(args) -> int:
    return _follow(LocalCluster(args.name).restore(args.snapshot, timeout=args.timeout))


def cmd_train(args) -> int:
    from moecluster.cli.train import train
    from moecluster.sdk.data_parallel import TrainerGroupBroken
    from moecluster.sdk.training import TrainingError

    restartable, save_dir = args.resume == "auto", args.save_dir or ""
    if restartable and args.until is None:
        raise ClusterError("--resume auto needs --until STEP: with --steps, every restart would train that many more")
    if args.controller:  # a cluster moectl did not start: the operator's on Kubernetes, or a Ray head's
        if not args.model:
            raise ClusterError("--controller needs --model: the checkpoint folder as this process sees it")
        if restartable and not save_dir:
            raise ClusterError("--resume auto with --controller needs --save-dir: the folder of this job's saves, "
                               "as the workers see it")
        controller, model = args.controller, args.model
    else:
        cluster = LocalCluster(args.name)
        info = cluster.info()
        cluster.status()  # a clear error if the controller is down
        saving = "--save-every" if args.save_every else "--resume auto" if restartable else ""
        if saving and not (args.save_dir or cluster.spec().snapshot_dir):
            raise ClusterError(f"{saving} needs --save-dir, or a cluster started with --snapshot-dir "
                               f"(`moectl up --name {args.name} --snapshot-dir DIR`)")
        controller, model = info["controller"], args.model or info["model"]
        if info.get("internal_tls"):  # the trainer calls the controller and workers with the cluster's certificates
            os.environ[internal_tls.ENV] = info["internal_tls"]
        save_dir = save_dir or (cluster.spec().snapshot_dir if restartable else "")
    group, device, progress = trainer_group(args.dist_init, args.device, args.dist_timeout)
    try:
        train(controller, model, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed,
              out=args.out, progress=progress, device=device, save_every=args.save_every, save_dir=save_dir,
              resume=None if restartable else args.resume, cluster=args.cluster or "", group=group, until=args.until,
              restartable=restartable)
    except (TrainingError, TrainerGroupBroken) as err:  # said in a line: under torchrun every trainer prints it
        raise ClusterError(str(err)) from err
    if group is None or group.leader:
        print(f"metrics in {args.out}/metrics.jsonl, model in {args.out}/final")
    return 0


def trainer_group(init_method: str, device: str, timeout_s: float | None = None):
    """Under torchrun (WORLD_SIZE > 1): this trainer's group (a TrainerGroup over gloo, or NCCL for a CUDA
    dense model, each trainer on GPU LOCAL_RANK), its device and a progress that names it; else
    (None, device, _progress). `timeout_s`: how long a collective waits for a member before the group
    breaks (None: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device, _progress
    import datetime

    import torch.distributed as dist
    from moecluster.models.devices import resolve_device
    from moecluster.sdk.data_parallel import TrainerGroup

    rank = int(os.environ["RANK"])
    if resolve_device(device).type == "cuda" and ":" not in device:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    dist.init_process_group("nccl" if resolve_device(device).type == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=world, timeout=timeout)
    group = TrainerGroup(dist.group.WORLD, timeout=timeout)
    return group, device, (_progress if rank == 0 else lambda message: _progress(f"[trainer {rank}] {message}"))


def cmd_down(args) -> int:
    names = cluster_names() if args.all else [args.name]
    for name in names:
        stopped = LocalCluster(name).down(grace=args.grace)
        print(f"cluster {name!r}: stopped {len(stopped)} processes")
    return 0


def cmd_list(args) -> int:
    for name in cluster_names():
        cluster = LocalCluster(name)
        info = cluster.info()
        state = "up" if cluster.controller_running() else "controller down"
        frontend = f"127.0.0.1:{info['frontend_port']}" if info["frontend_port"] else "(starting)"
        print(f"{name:<16} {frontend:<16} {state:<16} {info['model']}")
    return 0


def cmd_demo(args) -> int:
    from moecluster.cli.demo import run_demo

    return run_demo(workers=args.workers, replicas=args.replicas, port=args.port, family=args.family)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moectl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="make or inspect checkpoints").add_subparsers(dest="model_command", required=True)
    create = model.add_parser("create", help="write a tiny random checkpoint in a family's real on-disk format")
    create.add_argument("--family", required=True, help="mixtral, qwen2_moe, qwen3_moe, olmoe or deepseek_v3")
    create.add_argument("--out", required=True, help="folder to write config.json and safetensors to")
    create.add_argument("--layers", type=int, default=2, help="MoE layers (default 2)")
    create.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    create.add_argument("--intermediate", type=int, default=32, help="each expert's intermediate size (default 32)")
    create.add_argument("--experts", type=int, default=8, help="routed experts per layer (default 8)")
    create.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    create.add_argument("--vocab", type=int, default=128, help="vocabulary size (default 128)")
    create.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    create.add_argument("--shard-size", help="split the weights into files of at most this size, e.g. 100KB")
    create.set_defaults(func=cmd_model_create)

    up = sub.add_parser("up", help="start a local cluster: a frontend and N expert workers on 127.0.0.1")
    up.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    up.add_argument("--workers", type=int, default=2, help="expert worker processes (default 2)")
    up.add_argument("--replicas", type=int, default=1, help="copies of every expert, on distinct workers (default 1)")
    up.add_argument("--port", type=int, default=50051,
                    help="frontend port on 127.0.0.1 (default 50051; 0: any free port, kept when the frontend restarts)")
    up.add_argument("--name", default="default", help="cluster name; several can run at once (default 'default')")
    up.add_argument("--detach", action="store_true", help="return once serving; stop later with `moectl down`")
    up.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker (default 1)")
    up.add_argument("--worker-device", default="cpu",
                    help="where workers keep and compute their experts: cpu (default), cuda, cuda:N, or auto (a GPU "
                         "where the worker sees one; with --backend ray, give workers GPUs through the spec)")
    up.add_argument("--frontend-device", default="cpu",
                    help="where the frontend runs the dense model (embeddings, attention, router): cpu (default), cuda, "
                         "cuda:N, or auto")
    up.add_argument("--worker-batch-tokens", type=int, metavar="N",
                    help="a worker computes the inference requests for a layer that arrive while it computes as one "
                    "kernel call of up to N tokens (default 2048); 0: each request alone, its answer independent of "
                    "its company's (batched answers differ by float rounding)")
    up.add_argument("--worker-compute-threads", type=int, metavar="N",
                    help="threads a worker computes those calls on (default 2: one computes while the other prepares)")
    up.add_argument("--generate-cache-tokens", type=int, metavar="N",
                    help="the frontend decodes generations, greedy and sampled, together in one running batch with a KV "
                    "cache of N tokens of all their sequences (default 4096; larger on a GPU); 0: each generation alone")
    up.add_argument("--forward-batch-tokens", type=int, metavar="N",
                    help="the frontend computes the Forward requests that arrive while it computes others as one "
                    "forward of up to N of their tokens (default 2048); 0: each request alone")
    up.add_argument("--api-keys", metavar="FILE", help="the frontend serves only clients that send one of the keys "
                    "in FILE: Client(address, api_key=KEY) or MOECLUSTER_API_KEY. A line: KEY [name=NAME] "
                    "[requests-per-second=R] [tokens-per-minute=T] (calls and tokens counted by NAME on /metrics; "
                    "over R a second, or past T tokens a minute, refused: RESOURCE_EXHAUSTED); re-read when it changes")
    up.add_argument("--tls-cert", metavar="FILE", help="the frontend serves TLS with this PEM certificate chain "
                    "(with --tls-key; clients: Client(address, tls=CA_FILE)); re-read when it changes")
    up.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    up.add_argument("--internal-tls", action="store_true", help="the cluster's parts call each other over mutual TLS, "
                    "under a CA made for it; SDK admin calls and trainers need MOECLUSTER_INTERNAL_TLS (`moectl status`)")
    up.add_argument("--capacity", type=int, help="experts one worker may hold (default: 1.5x its even share)")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for the cluster to serve (default 300)")
    up.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local: processes on this machine (default); ray: Ray actors on a Ray cluster")
    up.add_argument("--address", help="with --backend ray: the Ray cluster (host:port or ray://...; default: start one "
                    "on this machine)")
    up.add_argument("--serve-grpc-port", type=int, help="with --backend ray: also serve gRPC through Ray Serve's "
                    "proxy on this port (Ray binds it on every interface)")
    up.add_argument("--standby", type=int, default=0, help="spare workers kept started and empty: a scale-up takes "
                    "one instead of starting a process (worth it where a start is slow: Ray actors; default 0)")
    up.add_argument("--colocate", action="store_true", help="co-locate experts that tokens pick together (as the "
                    "frontend reports them): fewer workers per token, for expert copies while routing shifts; "
                    "`moectl status` shows the share of pair traffic that shares a worker either way")
    up.add_argument("--rebalance-above", type=float, default=1.3, metavar="X",
                    help="re-place experts for load when the MoE layers wait X times longer than with an even split "
                    "and a new placement would cut that by half the margin (default 1.3; a large X, say 100, moves "
                    "experts for load never: only scaling, failures and migrations move them)")
    up.add_argument("--rebalance-min-load", type=float, default=50.0, metavar="TOKENS_PER_S",
                    help="expert load below which a layer's imbalance is noise, not a reason to move (default 50)")
    up.add_argument("--max-replicas", type=int, metavar="N", help="cap on copies of a hot expert (default: the "
                    "pool size); at least --replicas")
    up.add_argument("--snapshot-dir", help="folder for training snapshots (experts lost with every copy are restored from it)")
    up.add_argument("--snapshot-every", type=float, help="seconds between snapshots while training (needs --snapshot-dir)")
    up.add_argument("--snapshot-keep", type=int, default=3, metavar="N",
                    help="snapshots kept: the newest N, and the newest holding a trainer's state (default 3; 0 keeps all)")
    up.set_defaults(func=cmd_up)

    scale = sub.add_parser("scale", help="grow or shrink the worker pool with no failed requests; waits until it serves")
    scale.add_argument("--workers", type=int, required=True, help="the new number of expert workers")
    scale.add_argument("--name", default="default")
    scale.add_argument("--timeout", type=float, default=600)
    scale.set_defaults(func=cmd_scale)

    migrate = sub.add_parser("migrate", help="move one copy of an expert to a worker (copy, switch, then drop)")
    migrate.add_argument("--layer", type=int, required=True)
    migrate.add_argument("--expert", type=int, required=True)
    migrate.add_argument("--to", required=True, help="worker id, as `moectl status` shows it")
    migrate.add_argument("--from", dest="source", help="which copy moves (default: any holder)")
    migrate.add_argument("--name", default="default")
    migrate.add_argument("--timeout", type=float, default=600)
    migrate.set_defaults(func=cmd_migrate)

    drain = sub.add_parser("drain", help="move a worker's experts away, then stop it (the pool shrinks by one)",
                           description="Moves WORKER's experts to the others (copy before switch), then stops it; "
                           "the pool shrinks by one (a drained standby spare is replaced instead). The worker is "
                           "named in the cluster's spec, so a controller restarted meanwhile goes on with it, and "
                           "asking again for the same worker waits for that drain and removes no other.")
    replace = sub.add_parser("replace", help="start a new worker, move a worker's experts to it, then stop the old "
                             "one (the pool keeps its size)",
                             description="Starts a new worker first (or takes a standby spare), moves WORKER's experts "
                             "to it (copy before switch), then stops WORKER: the pool never has fewer workers than "
                             "asked for, e.g. to move off a node before its maintenance or off a suspect GPU. While "
                             "no new worker can start, WORKER keeps serving. Like drain, it is named in the spec and "
                             "asking again waits for it.")
    for verb in (drain, replace):
        verb.add_argument("worker", help="worker id, as `moectl status` shows it")
        verb.add_argument("--name", default="default")
        verb.add_argument("--timeout", type=float, default=600)
        verb.set_defaults(func=cmd_drain, replace=verb is replace)

    train = sub.add_parser("train", help="train the cluster's model on random tokens: dense parts here, experts on the workers")
    train.add_argument("--name", default="default")
    train.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    train.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    train.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3; weight decay 0)")
    train.add_argument("--seed", type=int, default=0, help="step s trains on a batch drawn with seed SEED + s (default 0)")
    train.add_argument("--out", required=True, help="folder for metrics.jsonl and the trained model (final/)")
    train.add_argument("--device", default="cpu", help="where the dense model trains: cpu (default), cuda, cuda:N "
                       "or auto; the experts train on their workers")
    train.add_argument("--controller", metavar="HOST:PORT",
                       help="train through this controller instead of a local cluster's (on Kubernetes: the "
                       "operator's controller Service, with --cluster)")
    train.add_argument("--cluster", metavar="NAMESPACE/NAME", help="the MoECluster, where one endpoint serves several")
    train.add_argument("--model", help="the checkpoint folder (default: the local cluster's)")
    train.add_argument("--dist-init", default="env://", metavar="URL",
                       help="data parallel: under torchrun (WORLD_SIZE > 1) the trainers meet here and split each "
                       "step's batch by rank (default env://, torchrun's; file:///shared/path works too)")
    train.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                       help="data parallel: a trainer that hangs this long in a collective breaks the group, which "
                       "its launcher can then restart (default: torch's, 30 min for gloo); longer than any save or "
                       "resume of the whole pool, which the other trainers wait for")
    train.add_argument("--save-every", type=int, default=0, metavar="N",
                       help="every N steps, snapshot the whole training state: the experts' (by their workers) and "
                       "the dense model's and optimizer's (trainer.pt, beside them, sent to a worker); default: never")
    train.add_argument("--save-dir", help="where --save-every snapshots go, as the workers see it (default: the "
                       "cluster's --snapshot-dir); a directory every worker can write into, checked before the "
                       "first step (it is not made)")
    train.add_argument("--resume", metavar="SNAPSHOT",
                       help="roll every expert back to SNAPSHOT (a step-NNNNNNNN folder, or a folder of them: the "
                       "newest with a trainer.pt; as the workers see it) and continue from its dense state; refused "
                       "while another trainer is connected. `--resume auto`: a job that restarts itself (torchrun "
                       "--max-restarts, a Kubernetes Job): go on from the newest save in --save-dir if there is one, "
                       "else save the start there first; with --until (needed), a restart does only what is left")
    train.add_argument("--until", type=int, metavar="STEP",
                       help="instead of --steps more steps: train until the pool has made STEP updates")
    train.set_defaults(func=cmd_train)

    snapshot = sub.add_parser("snapshot", help="write every expert's training state (weights, AdamW moments, version)")
    snapshot.add_argument("--name", default="default")
    snapshot.add_argument("--dir", help="snapshots go to DIR/step-NNNNNNNN/ (default: the cluster's --snapshot-dir)")
    snapshot.add_argument("--timeout", type=float, default=600)
    snapshot.set_defaults(func=cmd_snapshot)

    snaps = sub.add_parser("snapshots", help="the snapshots a restore or a resume can use, the newest first")
    snaps.add_argument("--name", default="default")
    snaps.add_argument("--dir", help="a folder of snapshots this machine sees (default: the cluster's --snapshot-dir, "
                       "listed by one of its workers)")
    snaps.set_defaults(func=cmd_snapshots)

    restore = sub.add_parser("restore", help="roll every expert (weights, AdamW moments, version) back to a snapshot; "
                             "refused while a trainer is connected")
    restore.add_argument("snapshot", nargs="?", help="a step-NNNNNNNN folder, or a folder of them: the newest whose "
                         "files pass their digests (default: the cluster's --snapshot-dir)")
    restore.add_argument("--name", default="default")
    restore.add_argument("--timeout", type=float, default=600)
    restore.set_defaults(func=cmd_restore)

    resume = sub.add_parser("resume", help="restart a cluster's controller (it rebuilds its state from the workers) "
                            "and its supervisor, which restarts a controller that dies: for when both are gone")
    resume.add_argument("--name", default="default")
    resume.add_argument("--timeout", type=float, default=300)
    resume.set_defaults(func=cmd_resume)

    status = sub.add_parser("status", help="workers, their experts and state")
    status.add_argument("--name", default="default")
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    status.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop a cluster and every process it started")
    down.add_argument("--name", default="default")
    down.add_argument("--all", action="store_true", help="stop every local cluster")
    down.add_argument("--grace", type=float, default=5.0, help="seconds before SIGKILL (default 5)")
    down.set_defaults(func=cmd_down)

    lst = sub.add_parser("list", help="local clusters that are up")
    lst.set_defaults(func=cmd_list)

    generate.add_parser(sub)

    demo = sub.add_parser("demo", help="tiny model -> local cluster -> requests checked against transformers -> down")
    demo.add_argument("--family", default="qwen3_moe")
    demo.add_argument("--workers", type=int, default=3)
    demo.add_argument("--replicas", type=int, default=2)
    demo.add_argument("--port", type=int, default=0, help="frontend port (default: any free port)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        sys.exit(args.func(args))
    except (ClusterError, ValueError) as err:
        sys.exit(f"moectl: {err}")
    except KeyboardInterrupt:
        sys.exit("moectl: interrupted; stopped what was started")


if __name__ == "__main__":
    main()
