"""One trainer of a data-parallel group, in a process of its own: `moecluster.cli.train.train` with a gloo
group met through a file (loopback only), and faults to inject. tests/test_data_parallel.py starts these."""

from __future__ import annotations

import argparse
import os
import signal

import torch.distributed as dist
from moecluster.cli.moectl import trainer_group
from moecluster.cli.train import train
from moecluster.frontend.dispatcher import ExpertUnavailableError


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--init", "--controller", "--model", "--out"):
        p.add_argument(name, required=True)
    for name in ("--rank", "--world", "--steps", "--batch", "--seq", "--seed"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--cut-at", type=int, default=-1, help="this trainer's step S is cut once, as a lost worker cuts it")
    p.add_argument("--kill-at", type=int, default=-1, help="mid-step S, kill -9 --kill-pid")
    p.add_argument("--kill-pid", type=int, default=0)
    p.add_argument("--fail-at", type=int, default=-1, help="mid-step S, raise an error that is no lost worker")
    p.add_argument("--die-at", type=int, default=-1, help="mid-step S, this trainer is killed (-9)")
    p.add_argument("--hang-at", type=int, default=-1, help="mid-step S, this trainer stops (SIGSTOP)")
    p.add_argument("--timeout", type=float, help="seconds a collective waits for a member (moectl --dist-timeout)")
    p.add_argument("--until", type=int, help="train until the pool has made this many updates")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--restart-dir", default="", help="a restartable run (`moectl train --resume auto`) saving here")
    args = p.parse_args()
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world))
    group, _, _ = trainer_group(args.init, "cpu", args.timeout)  # as `moectl train` makes it
    done: set[str] = set()

    def mid_step(s: int) -> None:
        if s == args.cut_at and "cut" not in done:
            done.add("cut")
            raise ExpertUnavailableError("injected: the worker of some expert was lost mid-step")
        if s == args.kill_at and "kill" not in done:
            done.add("kill")
            os.kill(args.kill_pid, signal.SIGKILL)
        if s == args.fail_at:
            raise ValueError("injected: a bug in this trainer's step")
        if s == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if s == args.hang_at:
            os.kill(os.getpid(), signal.SIGSTOP)

    try:
        train(args.controller, args.model, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed,
              out=args.out, progress=lambda line: print(line, flush=True), mid_step=mid_step,
              group=group, until=args.until, save_every=args.save_every, save_dir=args.restart_dir,
              restartable=bool(args.restart_dir))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
