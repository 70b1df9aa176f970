"""`moectl generate`: token ids in, a cluster's continuation out, from the command line.

  moectl generate 3 1 4 1 5 --max-new-tokens 8                 # greedy, the default cluster
  moectl generate 3 1 4 --sample --seed 7 --temperature 0.8 --stream   # printed as each token is decoded
  moectl generate 3 1 4 --until-eos --stop 13 --endpoint HOST:PORT -o json

The tokens are one row (a tokenizer is the caller's: moecluster speaks token ids). Greedy unless
--sample; a seed draws the same tokens every time, as transformers' `generate` after
`torch.manual_seed(SEED)` would. Exactly --max-new-tokens tokens unless --until-eos or --stop end
the row earlier.
"""

from __future__ import annotations

import argparse
import json
import sys

from moecluster.backends.local import LocalCluster


def add_parser(sub) -> None:
    generate = sub.add_parser("generate", help="continue a row of token ids on a cluster (greedy, or sampled)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("tokens", type=int, nargs="+", metavar="TOKEN", help="the prompt's token ids")
    generate.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    where = generate.add_mutually_exclusive_group()
    where.add_argument("--name", default="default", help="a local cluster (default: default)")
    where.add_argument("--endpoint", metavar="HOST:PORT", help="any frontend (a Kubernetes Service, a Ray Serve "
                       "address http://HOST:PORT/NAME); its API key from MOECLUSTER_API_KEY")
    generate.add_argument("--tls", metavar="CA_FILE", help="the frontend serves TLS: the CA of its certificate")
    generate.add_argument("--sample", action="store_true", help="draw tokens instead of taking the likeliest")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    generate.add_argument("--temperature", type=float, help="sampling temperature (default: the checkpoint's, else 1)")
    generate.add_argument("--top-k", type=int, help="sample among the K likeliest, 0: all (default: the checkpoint's, "
                          "else 50)")
    generate.add_argument("--top-p", type=float, help="sample within the top-p mass (default: the checkpoint's, else 1)")
    generate.add_argument("--until-eos", action="store_true", help="end at the checkpoint's end-of-sequence token")
    generate.add_argument("--stop", type=int, nargs="+", default=[], metavar="TOKEN", help="token ids that end it too")
    generate.add_argument("--stream", action="store_true", help="print each token as it is decoded")
    generate.add_argument("-o", "--output", choices=["text", "json"], default="text")
    generate.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from moecluster.sdk.client import Client, MoEClusterError

    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if not args.sample and any(v is not None for v in sampling.values()):
        raise ValueError("--temperature, --top-k and --top-p are for --sample")
    if args.stream and args.output == "json":
        raise ValueError("--stream prints text as it comes; -o json prints once, at the end")
    endpoint = args.endpoint or LocalCluster(args.name).status()["endpoint"]
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed, until_eos=args.until_eos,
                    stop_tokens=args.stop, **sampling)
    made = []  # streamed, so a row that ended early is exactly its tokens (Generate pads it with 0)
    with Client(endpoint, tls=args.tls or False, timeout=600) as client:
        try:
            for _, tokens in client.generate_stream([args.tokens], **settings):
                made += tokens
                if args.stream:
                    print(" ".join(map(str, tokens)), end=" ", flush=True)
        except MoEClusterError as err:
            sys.exit(f"moectl: generate: {err}")
    if args.stream:
        print()
    elif args.output == "json":
        print(json.dumps({"prompt": args.tokens, "tokens": made}))
    else:
        print(" ".join(map(str, made)))
    return 0
