"""Training on one worker through its RPCs: Backward equals autograd, ApplyUpdate equals torch.optim.AdamW,
updates apply exactly once, state (weights, moments, version) moves with a pull and survives a snapshot."""

from __future__ import annotations

import grpc
import pytest
import torch
from moecluster.protos import worker_pb2
from moecluster.wire import streaming
from moecluster.wire.tensors import decode, encode
from moecluster.workers.kernels import reference_experts
from shared import running_workers
from worker_helpers import TIMEOUT_S, keys, routing, stats, stub_for

HYPER = worker_pb2.AdamW(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
LAYER = 0
EXPERTS = list(range(8))


def backward(stub, hidden, index, weights, grad, *, step, contribution=0, attempt=0, session="s", primary=None):
    primary = torch.ones_like(index, dtype=torch.bool) if primary is None else primary
    response = stub.Backward(worker_pb2.BackwardRequest(
        layer=LAYER, hidden_states=encode(hidden), top_k_index=encode(index), top_k_weights=encode(weights),
        grad_output=encode(grad), primary=encode(primary), step=step, session=session, attempt=attempt,
        contribution=contribution), timeout=TIMEOUT_S)
    return decode(response.grad_hidden_states).clone(), decode(response.grad_top_k_weights).clone()


def update(stub, step, contributions, *, attempt=0, session="s", experts=EXPERTS, average_over=0):
    request = worker_pb2.ApplyUpdateRequest(
        step=step, session=session, attempt=attempt, adamw=HYPER, average_over=average_over,
        experts=[worker_pb2.ExpertUpdate(expert=keys((LAYER, e))[0], contributions=contributions.get(e, []))
                 for e in experts])
    return {a.expert.expert: a for a in stub.ApplyUpdate(request, timeout=TIMEOUT_S).acks}


def used(index):
    return {int(e) for e in index.flatten().tolist() if e >= 0}


def exported(stub, expert):
    from worker_helpers import export

    state, _ = export(stub, LAYER, expert)
    return decode(state.gate_up_proj).clone(), decode(state.down_proj).clone(), state


def batch(seed):
    hidden, index, weights = routing(12, EXPERTS, seed=seed)
    grad = torch.randn(12, 64, generator=torch.Generator().manual_seed(100 + seed))
    return hidden, index, weights, grad


@pytest.fixture
def worker(qwen3):
    with running_workers(qwen3, {(LAYER, e): ("w",) for e in EXPERTS}) as servers:
        channel, stub = stub_for(servers["w"])
        with channel:
            yield stub


def test_three_steps_equal_autograd_and_torch_adamw(worker, weights):
    gate_up = weights[LAYER][0].clone().requires_grad_()
    down = weights[LAYER][1].clone().requires_grad_()
    opt = torch.optim.AdamW([gate_up, down], lr=HYPER.lr, betas=(HYPER.beta1, HYPER.beta2), eps=HYPER.eps,
                            weight_decay=HYPER.weight_decay)
    for step in (1, 2, 3):
        contributions = {}
        opt.zero_grad()
        for c in range(2):  # two backward calls (micro-batches) per step
            hidden, index, top_w, grad = batch(10 * step + c)
            x, w = hidden.clone().requires_grad_(), top_w.clone().requires_grad_()
            reference_experts(x, gate_up, down, index.long(), w).backward(grad)
            got_x, got_w = backward(worker, hidden, index, top_w, grad, step=step, contribution=c)
            assert torch.allclose(got_x, x.grad, atol=1e-5) and torch.allclose(got_w, w.grad, atol=1e-5)
            for e in used(index):
                contributions.setdefault(e, []).append(c)
        opt.step()
        acks = update(worker, step, contributions)
        assert {a.version for a in acks.values()} == {step} and not any(a.duplicate for a in acks.values())
    for e in EXPERTS:
        g, d, state = exported(worker, e)
        assert state.version == 3 and len(state.optimizer_state) == 4
        assert (g - gate_up[e]).abs().max() < 1e-5 and (d - down[e]).abs().max() < 1e-5
    assert set(stats(worker).versions) == {3}


def test_data_parallel_trainers_contributions_are_averaged_as_torch_averages_their_gradients(worker, weights):
    """Two trainers, each sending the gradient of its own batch's mean loss (contribution ids 0 and 1), with
    average_over 2: the update equals AdamW on the mean of the two gradients, as DistributedDataParallel does."""
    gate_up = weights[LAYER][0].clone().requires_grad_()
    down = weights[LAYER][1].clone().requires_grad_()
    opt = torch.optim.AdamW([gate_up, down], lr=HYPER.lr, betas=(HYPER.beta1, HYPER.beta2), eps=HYPER.eps,
                            weight_decay=HYPER.weight_decay)
    for step in (1, 2):
        contributions, summed = {}, [torch.zeros_like(gate_up), torch.zeros_like(down)]
        for rank in range(2):
            hidden, index, top_w, grad = batch(50 + 10 * step + rank)
            out = reference_experts(hidden, gate_up, down, index.long(), top_w)
            for total, part in zip(summed, torch.autograd.grad(out, [gate_up, down], grad)):
                total.add_(part)  # as the worker sums contributions: in id order, then divides
            backward(worker, hidden, index, top_w, grad, step=step, contribution=rank)
            for e in used(index):
                contributions.setdefault(e, []).append(rank)
        gate_up.grad, down.grad = summed[0] / 2, summed[1] / 2
        opt.step()
        update(worker, step, contributions, average_over=2)
    for e in EXPERTS:
        g, d, _ = exported(worker, e)
        assert (g - gate_up[e]).abs().max() < 1e-5 and (d - down[e]).abs().max() < 1e-5


def test_repeated_and_late_messages_change_nothing(worker):
    hidden, index, top_w, grad = batch(1)
    contributions = {e: [0] for e in used(index)}
    for _ in range(2):  # a repeated backward call: its gradient is kept once
        backward(worker, hidden, index, top_w, grad, step=1)
    first = update(worker, 1, contributions)
    before = {e: exported(worker, e)[:2] for e in EXPERTS}
    again = update(worker, 1, contributions)  # a repeated update: the stored acknowledgement
    assert all(again[e].duplicate and again[e].digest == first[e].digest and again[e].version == 1 for e in EXPERTS)
    with pytest.raises(grpc.RpcError) as late:  # a late gradient for a step already applied
        backward(worker, hidden, index, top_w, grad, step=1, contribution=5)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "applied already" in late.value.details()
    with pytest.raises(grpc.RpcError) as early:  # an update that skips a step
        update(worker, 3, {})
    assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "missed updates" in early.value.details()
    for e in EXPERTS:
        g, d, state = exported(worker, e)
        assert state.version == 1 and torch.equal(g, before[e][0]) and torch.equal(d, before[e][1])

    # Same result as a worker that got each message once.
    replay = update(worker, 2, {})
    assert all(a.version == 2 for a in replay.values())


def test_update_missing_a_contribution_is_refused_whole(worker):
    hidden, index, top_w, grad = batch(2)
    backward(worker, hidden, index, top_w, grad, step=1, contribution=0)
    named = {e: [0, 1] for e in used(index)}  # contribution 1 never arrived
    with pytest.raises(grpc.RpcError) as err:
        update(worker, 1, named)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "has [0]" in err.value.details()
    assert set(stats(worker).versions) == {0}  # no expert applied anything, not even those without gradients


def test_a_newer_attempt_discards_the_older_gradient(worker, qwen3):
    hidden, index, top_w, grad = batch(3)
    backward(worker, hidden, index, top_w, grad * 100, step=1, attempt=0)
    backward(worker, hidden, index, top_w, grad, step=1, attempt=1)
    with pytest.raises(grpc.RpcError) as err:  # the old attempt, arriving late
        backward(worker, hidden, index, top_w, grad, step=1, attempt=0, contribution=7)
    assert "superseded" in err.value.details()
    acks = update(worker, 1, {e: [0] for e in used(index)}, attempt=1)
    with running_workers(qwen3, {(LAYER, e): ("v",) for e in EXPERTS}) as servers:  # the same, in one attempt
        channel, other = stub_for(servers["v"])
        with channel:
            backward(other, hidden, index, top_w, grad, step=1)
            fresh = update(other, 1, {e: [0] for e in used(index)})
    assert {e: a.digest for e, a in acks.items()} == {e: a.digest for e, a in fresh.items()}


def test_only_primary_slots_return_input_gradients(worker, weights, qwen3):
    hidden, index, top_w, grad = batch(4)
    primary = torch.zeros_like(index, dtype=torch.bool)
    primary[:, 0] = True
    got_x, got_w = backward(worker, hidden, index, top_w, grad, step=1, primary=primary)
    x, w = hidden.clone().requires_grad_(), top_w.clone().requires_grad_()
    reference_experts(x, *weights[LAYER], torch.where(primary, index, -1).long(), w).backward(grad)
    assert torch.allclose(got_x, x.grad, atol=1e-5) and torch.allclose(got_w, w.grad, atol=1e-5)
    assert torch.equal(got_w[:, 1], torch.zeros(12))
    # ... while the weight gradient kept covers every slot: the update equals one from an all-primary call
    acks = update(worker, 1, {e: [0] for e in used(index)})
    with running_workers(qwen3, {(LAYER, e): ("v",) for e in EXPERTS}) as servers:
        channel, other = stub_for(servers["v"])
        with channel:
            backward(other, hidden, index, top_w, grad, step=1)
            fresh = update(other, 1, {e: [0] for e in used(index)})
    assert {e: a.digest for e, a in acks.items()} == {e: a.digest for e, a in fresh.items()}


def test_a_pull_moves_weights_moments_and_version(qwen3):
    placement = {**{(LAYER, e): ("a",) for e in EXPERTS}, (1, 0): ("b",)}
    with running_workers(qwen3, placement) as servers:
        ca, a = stub_for(servers["a"])
        cb, b = stub_for(servers["b"])
        with ca, cb:
            for step in (1, 2):
                hidden, index, top_w, grad = batch(step)
                backward(a, hidden, index, top_w, grad, step=step)
                update(a, step, {e: [0] for e in used(index)})
            b.PullExpert(worker_pb2.PullExpertRequest(expert=keys((LAYER, 3))[0], source=servers["a"].address),
                         timeout=TIMEOUT_S)
            assert exported(b, 3)[2].version == 2
            hidden, index, top_w, grad = batch(9)
            index[:, 0] = 3  # both train expert 3 on the same tokens
            index[:, 1] = torch.where(index[:, 1] == 3, 4, index[:, 1])
            only3 = torch.where(index == 3, index, -1)
            acks = []
            for stub in (a, b):
                backward(stub, hidden, only3, top_w, grad, step=3)
                acks.append(update(stub, 3, {3: [0]}, experts=[3])[3])
            assert acks[0].digest == acks[1].digest and acks[0].version == 3
            assert [m.shape for m in exported(b, 3)[2].optimizer_state] == [[64, 64], [64, 32]] * 2


def trained_and_saved(worker, tmp_path) -> list:
    """One step, then experts 2 and 5 written into tmp_path; their snapshot files."""
    hidden, index, top_w, grad = batch(5)
    backward(worker, hidden, index, top_w, grad, step=1)
    update(worker, 1, {e: [0] for e in used(index)})
    return worker.WriteSnapshot(worker_pb2.WriteSnapshotRequest(directory=str(tmp_path), experts=keys((LAYER, 2), (LAYER, 5))),
                                timeout=TIMEOUT_S).files


def test_snapshot_restores_state_and_refuses_a_torn_file(worker, tmp_path):
    files = trained_and_saved(worker, tmp_path)
    assert [(f.expert.expert, f.version) for f in files] == [(2, 1), (5, 1)]
    saved = {e: exported(worker, e)[:2] for e in (2, 5)}
    update(worker, 2, {})  # moves on
    restored = worker.RestoreExperts(worker_pb2.RestoreExpertsRequest(directory=str(tmp_path), files=files,
                                                                      resume_version=2), timeout=TIMEOUT_S)
    assert [k.expert for k in restored.restored] == [2, 5]
    for e in (2, 5):
        g, d, state = exported(worker, e)
        assert state.version == 2 and torch.equal(g, saved[e][0]) and torch.equal(d, saved[e][1])
        assert len(state.optimizer_state) == 4
    path = tmp_path / files[0].file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    before = exported(worker, 2)[:2]
    with pytest.raises(grpc.RpcError) as err:  # at another version, so the file is read (this state is the file's)
        worker.RestoreExperts(worker_pb2.RestoreExpertsRequest(directory=str(tmp_path), files=files, resume_version=3),
                              timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "refused" in err.value.details()
    assert all(torch.equal(x, y) for x, y in zip(exported(worker, 2)[:2], before))


def test_a_restore_reads_only_the_experts_whose_state_changed_since_their_file(worker, tmp_path):
    """A group that restarts from the save it just wrote: the workers already hold that state."""
    files = trained_and_saved(worker, tmp_path)
    saved = {e: exported(worker, e) for e in (2, 5)}

    def restore(version=1):
        return worker.RestoreExperts(worker_pb2.RestoreExpertsRequest(directory=str(tmp_path), files=files,
                                                                      resume_version=version), timeout=TIMEOUT_S)

    kept = restore()
    assert [k.expert for k in kept.restored] == [2, 5] and kept.bytes_read == 0
    assert restore(version=3).bytes_read == sum(f.bytes for f in files)  # another version: read
    assert restore().bytes_read == sum(f.bytes for f in files)  # the state at version 3 is not the file's
    assert restore().bytes_read == 0  # now it is again
    hidden, index, top_w, grad = batch(6)
    backward(worker, hidden, index, top_w, grad, step=2)
    update(worker, 2, {2: [0]}, experts=[2])  # expert 2 moves on, 5 stays
    assert restore().bytes_read == files[0].bytes
    for e in (2, 5):
        g, d, state = exported(worker, e)
        assert state.version == 1 and torch.equal(g, saved[e][0]) and torch.equal(d, saved[e][1])
        assert [torch.equal(decode(a), decode(b)) for a, b in zip(state.optimizer_state, saved[e][2].optimizer_state)] \
            == [True] * 4
    # a kept expert's pending gradient goes as in any restore: step 2 cannot name it afterwards
    backward(worker, hidden, index, top_w, grad, step=2)
    assert restore().bytes_read == 0
    with pytest.raises(grpc.RpcError, match="this worker has \\[\\]"):
        update(worker, 2, {5: [0]}, experts=[5])


def test_a_rollback_to_an_older_step_lets_that_step_be_trained_again_alike(worker, tmp_path):
    hidden, index, top_w, grad = batch(5)
    backward(worker, hidden, index, top_w, grad, step=1)
    update(worker, 1, {e: [0] for e in used(index)})
    files = worker.WriteSnapshot(worker_pb2.WriteSnapshotRequest(
        directory=str(tmp_path), experts=keys(*[(LAYER, e) for e in EXPERTS])), timeout=TIMEOUT_S).files
    hidden, index, top_w, grad = batch(6)
    backward(worker, hidden, index, top_w, grad, step=2)
    first = update(worker, 2, {e: [0] for e in used(index)})
    assert {a.version for a in first.values()} == {2}
    # the pool goes back to step 1: held experts are replaced (version down, stored acknowledgements gone)
    worker.RestoreExperts(worker_pb2.RestoreExpertsRequest(directory=str(tmp_path), files=files, resume_version=1),
                          timeout=TIMEOUT_S)
    assert set(stats(worker).versions) == {1}
    backward(worker, hidden, index, top_w, grad, step=2)
    again = update(worker, 2, {e: [0] for e in used(index)})
    assert not any(a.duplicate for a in again.values())  # applied anew, not answered from before the rollback
    assert {e: a.digest for e, a in again.items()} == {e: a.digest for e, a in first.items()}


def test_a_replica_that_missed_an_update_is_refreshed_from_a_peer_atomically(qwen3):
    with running_workers(qwen3, {(LAYER, e): ("a", "b") for e in EXPERTS}) as servers:
        ca, a = stub_for(servers["a"])
        cb, b = stub_for(servers["b"])
        with ca, cb:
            hidden, index, top_w, grad = batch(1)
            backward(a, hidden, index, top_w, grad, step=1)  # b's gradient is lost on the way
            update(a, 1, {e: [0] for e in used(index)})
            with pytest.raises(grpc.RpcError) as refused:
                update(b, 1, {e: [0] for e in used(index)})
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            pull = worker_pb2.PullExpertRequest(expert=keys((LAYER, 3))[0], source=servers["a"].address)
            assert b.PullExpert(pull, timeout=TIMEOUT_S).bytes == 0 and exported(b, 3)[2].version == 0  # held: no-op
            pull.refresh = True
            assert b.PullExpert(pull, timeout=TIMEOUT_S).bytes > 0
            (gate_up, down, state), (want_gate_up, want_down, want) = exported(b, 3), exported(a, 3)
            assert state.version == want.version == 1
            assert torch.equal(gate_up, want_gate_up) and torch.equal(down, want_down)
            assert [m.data for m in state.optimizer_state] == [m.data for m in want.optimizer_state] != []
            assert b.PullExpert(pull, timeout=TIMEOUT_S).bytes == 0, "as new as the source: nothing to copy"
            back = worker_pb2.PullExpertRequest(expert=keys((LAYER, 4))[0], source=servers["b"].address, refresh=True)
            assert a.PullExpert(back, timeout=TIMEOUT_S).bytes == 0 and exported(a, 4)[2].version == 1, \
                "an older source never replaces a newer copy"


def test_a_trainers_forward_is_answered_only_at_its_step_and_a_refresh_that_is_not_needed_sends_nothing(qwen3,
                                                                                                       monkeypatch):
    with running_workers(qwen3, {(LAYER, e): ("a", "b") for e in EXPERTS}) as servers:
        ca, a = stub_for(servers["a"])
        cb, b = stub_for(servers["b"])
        with ca, cb:
            hidden, index, top_w, grad = batch(1)
            backward(a, hidden, index, top_w, grad, step=1)
            update(a, 1, {e: [0] for e in used(index)})  # a is at version 1, b missed step 1 (still 0)
            ask = worker_pb2.ForwardRequest(layer=LAYER, hidden_states=encode(hidden), top_k_index=encode(index),
                                            top_k_weights=encode(top_w), step=2)
            trained = decode(a.Forward(ask, timeout=TIMEOUT_S).output)
            with pytest.raises(grpc.RpcError) as behind:
                b.Forward(ask, timeout=TIMEOUT_S)
            assert behind.value.code() == grpc.StatusCode.ABORTED and "version 0" in behind.value.details()
            ask.step = 0  # inference: any version answers
            assert not torch.equal(decode(b.Forward(ask, timeout=TIMEOUT_S).output), trained)
            ask.step = 1
            with pytest.raises(grpc.RpcError) as ahead:
                a.Forward(ask, timeout=TIMEOUT_S)
            assert ahead.value.code() == grpc.StatusCode.ABORTED and "applied already" in ahead.value.details()

            expert = keys((LAYER, 3))[0]
            offer = a.OfferExpert(worker_pb2.ExportExpertRequest(expert=expert, newer_than=1), timeout=TIMEOUT_S)
            assert offer.version == 1 and not offer.HasField("ticket"), "not newer than asked: no bytes offered"
            state = worker_pb2.ExpertState.FromString(streaming.join(
                a.ExportExpert(worker_pb2.ExportExpertRequest(expert=expert, newer_than=1), timeout=TIMEOUT_S),
                limit_bytes=1 << 24))
            assert state.version == 1 and not state.HasField("gate_up_proj") and not state.optimizer_state
            assert a.OfferExpert(worker_pb2.ExportExpertRequest(expert=expert, newer_than=0),
                                 timeout=TIMEOUT_S).HasField("ticket")

            for e in used(index):  # b catches up
                pull = worker_pb2.PullExpertRequest(expert=keys((LAYER, e))[0], source=servers["a"].address, refresh=True)
                assert b.PullExpert(pull, timeout=TIMEOUT_S).bytes > 0
            ask.step = 2
            assert torch.equal(decode(b.Forward(ask, timeout=TIMEOUT_S).output), trained)
            offers, offer = [], servers["a"].service.bulk.offer
            monkeypatch.setattr(servers["a"].service.bulk, "offer", lambda *args, **kw: offers.append(1) or offer(*args, **kw))
            assert b.PullExpert(pull, timeout=TIMEOUT_S).bytes == 0 and offers == [], "as new: not a byte offered"
