"""A local cluster whose frontend asks for an API key over TLS (`moectl up --api-keys --tls-cert --tls-key`):
the answers of transformers for a client that has both, a clear refusal for one that has not, and the calls and
tokens of each key's holder counted, those over its rate or token budget refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import grpc
import pytest
import torch
from moecluster import Client
from moecluster.sdk.client import MoEClusterError
from tls_files import make_ca
from transformers import AutoModelForCausalLM


def moectl(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moecluster.cli.moectl", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def test_a_frontend_with_api_keys_and_tls_serves_only_clients_that_bring_both(tmp_path, checkpoints, monkeypatch):
    model = checkpoints["qwen3_moe"]
    ca = make_ca(tmp_path)
    cert, key = ca.issue(tmp_path, "frontend", ["moe.example.internal"])  # not the address: a name override is needed
    keys = tmp_path / "api-keys"
    keys.write_text("first-key\nsecond-key name=batch-jobs requests-per-second=1000\n"
                    "slow-key name=slow requests-per-second=0.001  # one call, then none for 1000 s\n"
                    "token-key name=tokens tokens-per-minute=0.06  # 0.001 tokens/s: two small calls, then none\n")
    env = {**os.environ, "MOECLUSTER_HOME": str(tmp_path / "home"), "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("MOECLUSTER_API_KEY", None)
    up = moectl(env, "up", "--model", str(model), "--workers", "1", "--port", "0", "--detach",
                "--api-keys", str(keys), "--tls-cert", str(cert), "--tls-key", str(key))
    assert up.returncode == 0, up.stderr
    address = up.stdout.split(" on ", 1)[1].split()[0]
    try:
        ids = torch.randint(0, 100, (4, 600), generator=torch.Generator().manual_seed(0))  # 1.2 MB of logits: streamed
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(ids).logits
        trusted = {"tls": ca.pem, "tls_server_name": "moe.example.internal"}
        with Client(address, api_key="second-key", **trusted) as client:
            torch.testing.assert_close(client.forward(ids), expected, rtol=0, atol=1e-4)
            torch.testing.assert_close(client.forward(ids[:1, :8]), expected[:1, :8], rtol=0, atol=1e-4)
            assert client.generate(ids[:1, :5], max_new_tokens=3).shape == (1, 8)
        monkeypatch.setenv("MOECLUSTER_API_KEY", "first-key")
        with Client(address, **trusted) as client:
            assert client.info().num_experts == 8  # the key from the environment
        monkeypatch.delenv("MOECLUSTER_API_KEY")
        with Client(address, **trusted) as client, pytest.raises(MoEClusterError) as refused:
            client.forward(ids[:1, :8])
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and "api_key=KEY" in refused.value.message
        with Client(address, api_key="old-key", **trusted) as client, pytest.raises(MoEClusterError) as refused:
            client.info()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(address, api_key="second-key", timeout=5) as client, pytest.raises(MoEClusterError) as refused:
            client.info()  # plaintext to a TLS port
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "tls=" in refused.value.message
        with Client(address, api_key="slow-key", **trusted) as client:
            assert client.status().num_experts == 8
            with pytest.raises(MoEClusterError) as limited:
                client.status()
        assert limited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "slow is over its 0.001 requests/s" in \
            limited.value.message
        with Client(address, api_key="token-key", **trusted) as client:
            assert client.forward(ids[:1, :8]).shape[1] == 8  # 8 tokens: the budget of 0.06 is 7.94 below zero
            with pytest.raises(MoEClusterError) as spent:
                client.generate(ids[:1, :5], max_new_tokens=3)
        assert spent.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and \
            "tokens has used its 0.06 tokens/min: retry in 7940 s" in spent.value.message
        metrics = json.loads(next((tmp_path / "home").rglob("frontend.ready")).read_text())["metrics"]
        text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
        assert 'moecluster_frontend_client_calls_total{client="slow",outcome="limited"} 1' in text, text
        assert 'moecluster_frontend_client_calls_total{client="slow",outcome="admitted"} 1' in text
        assert 'moecluster_frontend_client_calls_total{client="batch-jobs",outcome="admitted"} 4' in text
        # tokens computed for each holder: forwards of 2400 and 8, a generation of 5 + 3 (Info costs none)
        assert 'moecluster_frontend_client_tokens_total{client="batch-jobs"} 2416' in text
        assert 'moecluster_frontend_client_tokens_total{client="tokens"} 8' in text
        assert 'moecluster_frontend_client_calls_total{client="tokens",outcome="limited"} 1' in text
    finally:
        assert moectl(env, "down").returncode == 0
