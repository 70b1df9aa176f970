"""`moectl generate` (cli/generate.py) against a real local cluster: greedy, sampled under a seed, ended
at a stop token, streamed, as JSON; bad settings fail with a message and a non-zero exit."""

from __future__ import annotations

import json
import os

import torch
from test_cli import moectl
from test_end_of_sequence import until_eos
from test_generation_batching import alone
from test_sampling import drawn
from transformers import AutoModelForCausalLM

PROMPT = [6, 19, 60, 44, 63, 69]


def test_generate_from_the_command_line(local_clusters, qwen3):
    cluster = local_clusters("cli-generate", qwen3, 1, 1)
    env = dict(os.environ)  # MOECLUSTER_HOME: the fixture's
    reference = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    words = [str(t) for t in PROMPT]

    def tokens(*args) -> list[int]:
        return [int(t) for t in moectl(env, "generate", *words, "--name", "cli-generate", *args).stdout.split()]

    greedy = alone(reference, PROMPT, 6)
    assert tokens("--max-new-tokens", "6") == greedy
    assert tokens("--max-new-tokens", "6", "--stream") == greedy
    assert tokens("--max-new-tokens", "5", "--sample", "--seed", "9", "--temperature", "0.7", "--top-k", "20") == \
        drawn(reference, PROMPT, 5, 9, temperature=0.7, top_k=20)
    at = next(i for i in range(1, 6) if greedy[i] not in greedy[:i])
    eos = reference.generation_config.eos_token_id
    assert tokens("--max-new-tokens", "6", "--stop", str(greedy[at])) == greedy[:at + 1]  # no padding printed
    assert until_eos(reference, PROMPT, 6, eos_token_id=[greedy[at]], suppress_tokens=[eos])[:at + 1] == greedy[:at + 1]
    doc = json.loads(moectl(env, "generate", *words, "--endpoint", cluster.status()["endpoint"], "--max-new-tokens", "3",
                            "-o", "json").stdout)
    assert doc == {"prompt": PROMPT, "tokens": greedy[:3]}

    for args, message in [(["--temperature", "0.5"], "--temperature, --top-k and --top-p are for --sample"),
                          (["--sample", "--top-p", "0"], "INVALID_ARGUMENT: top_p: 0.0, expected more than 0"),
                          (["--stop", "100000"], "stop_tokens: [100000] are not token ids of this model"),
                          (["--stream", "-o", "json"], "--stream prints text as it comes")]:
        failed = moectl(env, "generate", *words, "--name", "cli-generate", *args, check=False)
        assert failed.returncode != 0 and message in failed.stderr, (args, failed.stderr)
    missing = moectl(env, "generate", "1", "--name", "no-such-cluster", check=False)
    assert missing.returncode != 0 and "no-such-cluster" in missing.stderr
