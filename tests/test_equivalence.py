"""The headline: the cluster's logits equal transformers' own forward on the same checkpoint.

Workers are real gRPC servers on 127.0.0.1; the frontend's model is
transformers' own with each experts module swapped for a remote one.
"""

import pytest
import torch
from moecluster.controller.static_placement import static_placement
from moecluster.frontend.dense_model import load_dense_model
from moecluster.frontend.dispatcher import Dispatcher
from moecluster.frontend.routing import RoutingTable
from moecluster.models.checkpoint import Checkpoint
from shared import FAMILIES, running_workers
from transformers import AutoModelForCausalLM

TOLERANCE = 1e-4


def cluster_model(path, servers, placement):
    table = RoutingTable(1, {w: s.address for w, s in servers.items()}, placement)
    dispatcher = Dispatcher(table, timeout=30)
    return load_dense_model(Checkpoint(path), dispatcher), dispatcher


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_logits_equal_transformers(checkpoints, family, workers):
    path = checkpoints[family]
    geometry = Checkpoint(path).geometry
    placement = static_placement(geometry.moe_layers, geometry.num_experts, [f"w{i}" for i in range(workers)])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = torch.randint(0, reference.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(workers))
    with running_workers(path, placement) as servers:
        model, dispatcher = cluster_model(path, servers, placement)
        with torch.no_grad():
            logits = model(input_ids=batch).logits
            expected = reference(input_ids=batch).logits
        served = {w: s.service.Stats(None, None).requests for w, s in servers.items()}
        dispatcher.close()
    assert logits.shape == expected.shape
    error = (logits - expected).abs().max().item()
    assert error <= TOLERANCE, f"{family} on {workers} workers: max abs error {error:.3g}"
    assert expected.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    assert all(n > 0 for n in served.values()), f"every worker should have served: {served}"


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_greedy_generation_equals_transformers(checkpoints, family):
    path = checkpoints[family]
    geometry = Checkpoint(path).geometry
    placement = static_placement(geometry.moe_layers, geometry.num_experts, ["a", "b"], replicas=2)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 42, 9]])
    with running_workers(path, placement) as servers:
        model, dispatcher = cluster_model(path, servers, placement)
        with torch.no_grad():
            ours = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                                  do_sample=False, pad_token_id=0)
            theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                        min_new_tokens=10, do_sample=False, pad_token_id=0)
        dispatcher.close()
    assert torch.equal(ours, theirs)


def test_frontend_holds_no_expert_weight(checkpoints):
    path = checkpoints["qwen2_moe"]
    geometry = Checkpoint(path).geometry
    placement = static_placement(geometry.moe_layers, geometry.num_experts, ["a"])
    with running_workers(path, placement) as servers:
        model, dispatcher = cluster_model(path, servers, placement)
        dispatcher.close()
    names = [n for n, _ in model.named_parameters()]
    assert not any("experts.gate_up_proj" in n or "experts.down_proj" in n for n in names)
    assert any("shared_expert" in n for n in names), "shared experts stay in the frontend"
    assert any(n.endswith("mlp.gate.weight") for n in names), "the router stays in the frontend"
