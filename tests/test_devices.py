"""Workers and frontends on a GPU: experts and dense model in device memory, requests and copies as CPU bytes.

The device checks run everywhere; the rest needs CUDA. A worker on the GPU is compared with one on
the CPU over real gRPC: answers, peer copies both ways (weights, moments, versions), a training
step, and a snapshot written on one and restored on the other. A frontend on the GPU answers and
generates as transformers does on the CPU, and a trainer whose dense model is on the GPU trains as
plain PyTorch does."""

from __future__ import annotations

import pytest
import torch
from moecluster.controller.static_placement import static_placement
from moecluster.frontend.dispatcher import Dispatcher
from moecluster.frontend.routing import RoutingTable
from moecluster.frontend.server import FrontendService
from moecluster.models.checkpoint import Checkpoint
from moecluster.models.devices import resolve_device
from moecluster.protos import frontend_pb2, worker_pb2
from moecluster.wire.tensors import decode, encode
from shared import FAMILIES, running_workers
from worker_helpers import TIMEOUT_S, forward, keys, routing, stub_for

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HYPER = worker_pb2.AdamW(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def test_devices_are_checked_before_anything_loads():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="models run on cpu or cuda"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="cuda:99: " + ("only" if torch.cuda.is_available() else "torch sees no CUDA")):
        resolve_device("cuda:99")


def exported(stub, layer, expert):
    from worker_helpers import export

    state, _ = export(stub, layer, expert)
    return [decode(t).clone() for t in (state.gate_up_proj, state.down_proj, *state.optimizer_state)], state.version


def train(stub, step, hidden, index, weights, grad, experts):
    stub.Backward(worker_pb2.BackwardRequest(
        layer=0, hidden_states=encode(hidden), top_k_index=encode(index), top_k_weights=encode(weights),
        grad_output=encode(grad), primary=encode(torch.ones_like(index, dtype=torch.bool)), step=step, session="s",
        contribution=0), timeout=TIMEOUT_S)
    stub.ApplyUpdate(worker_pb2.ApplyUpdateRequest(step=step, session="s", adamw=HYPER, experts=[
        worker_pb2.ExpertUpdate(expert=keys((0, e))[0], contributions=[0]) for e in experts]), timeout=TIMEOUT_S)


@gpu
@pytest.mark.gpu
def test_a_gpu_worker_answers_trains_and_copies_like_a_cpu_worker(qwen3, tmp_path):
    placement = {(0, e): ("cpu", "gpu") for e in range(8)}
    with running_workers(qwen3, placement, devices={"gpu": "cuda"}) as servers:
        assert servers["gpu"].service.store.snapshot(0).gate_up.is_cuda
        (cc, cpu), (cg, gpu_) = stub_for(servers["cpu"]), stub_for(servers["gpu"])
        with cc, cg:
            hidden, index, top_w = routing(40, list(range(8)), seed=3)
            on_cpu, on_gpu = forward(cpu, 0, hidden, index, top_w), forward(gpu_, 0, hidden, index, top_w)
            assert on_gpu.device.type == "cpu" and torch.allclose(on_gpu, on_cpu, rtol=1e-2, atol=1e-3)

            grad = torch.randn(40, 64, generator=torch.Generator().manual_seed(5))
            for stub in (cpu, gpu_):
                train(stub, 1, hidden, index, top_w, grad, range(8))
            for e in range(8):
                (a, _), (b, _) = exported(cpu, 0, e), exported(gpu_, 0, e)
                assert all(torch.allclose(x, y, rtol=1e-2, atol=1e-4) for x, y in zip(a, b)), e

            for target, source in (("cpu", "gpu"), ("gpu", "cpu")):  # a copy is bit-identical, moments and version too
                stub = cpu if target == "cpu" else gpu_
                stub.DropExperts(worker_pb2.DropExpertsRequest(experts=keys((0, 2))), timeout=TIMEOUT_S)
                stub.PullExpert(worker_pb2.PullExpertRequest(expert=keys((0, 2))[0], source=servers[source].address),
                                timeout=TIMEOUT_S)
                (got, version), (sent, sent_version) = exported(stub, 0, 2), exported(cpu if source == "cpu" else gpu_, 0, 2)
                assert version == sent_version == 1 and len(got) == 6
                assert all(torch.equal(x, y) for x, y in zip(got, sent))

            written = gpu_.WriteSnapshot(worker_pb2.WriteSnapshotRequest(directory=str(tmp_path),
                                                                         experts=keys((0, 5))), timeout=TIMEOUT_S)
            cpu.RestoreExperts(worker_pb2.RestoreExpertsRequest(directory=str(tmp_path), files=written.files,
                                                                resume_version=1), timeout=TIMEOUT_S)
            assert all(torch.equal(x, y) for x, y in zip(exported(cpu, 0, 5)[0], exported(gpu_, 0, 5)[0]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_frontend_on_its_device_answers_and_generates_like_transformers(checkpoints, family, device):
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    geometry = Checkpoint(path).geometry
    placement = static_placement(geometry.moe_layers, geometry.num_experts, ["a", "b"])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = torch.randint(0, reference.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    prompt = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        expected = reference(input_ids=batch).logits
        greedy = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                                    do_sample=False, pad_token_id=0)
    with running_workers(path, placement) as servers:
        dispatcher = Dispatcher(RoutingTable(1, {w: s.address for w, s in servers.items()}, placement), timeout=30)
        service = FrontendService(Checkpoint(path), dispatcher, device=device)
        try:
            assert all(p.device.type == device for p in service.model.parameters())
            logits = decode(service.Forward(frontend_pb2.ForwardRequest(input_ids=encode(batch)), None).logits)
            ours = decode(service.Generate(frontend_pb2.GenerateRequest(input_ids=encode(prompt), max_new_tokens=8),
                                           None).sequences)
            assert service.Info(frontend_pb2.InfoRequest(), None).device == device
        finally:
            service.close()
            dispatcher.close()
    error = (logits - expected).abs().max().item()
    assert logits.device.type == "cpu" and error <= 1e-4, f"{family}: max abs error {error:.3g}"
    assert torch.equal(ours, greedy)


@gpu
@pytest.mark.gpu
def test_a_trainer_with_its_dense_model_on_the_gpu_trains_like_pytorch(local_clusters, qwen3, tmp_path):
    from moecluster.cli.train import batch_for, train
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    expected = []
    for s in range(5):
        x = batch_for(s, 0, model.config.vocab_size, 2, 8)
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        expected.append(loss.item())
    c = local_clusters("gpu-trainer", qwen3, 2, 2)
    rows = train(c.status()["controller"], c.info()["model"], steps=5, batch=2, seq=8, lr=1e-3, seed=0,
                 out=tmp_path / "run", progress=lambda line: None, device="cuda")
    for row, want in zip(rows, expected):
        assert abs(row["loss"] - want) <= 1e-4 * abs(want), (row, want)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32).state_dict()
    worst = max((trained[k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert worst <= 1e-4, worst
