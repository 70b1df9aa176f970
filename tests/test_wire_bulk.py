"""The bulk side channel: raw tensor bytes over a socket on 127.0.0.1, checked by length and digest."""

import socket

import pytest
import torch
from moecluster.wire import bulk
from moecluster.wire.bulk import BulkSender
from moecluster.wire.tensors import WireError

LIMIT = 1 << 30


@pytest.fixture
def sender():
    s = BulkSender("127.0.0.1", 0).start()
    yield s
    s.close()


def tensors():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(128, 64, generator=gen), torch.randn(64, 3, generator=gen).to(torch.bfloat16),
            torch.arange(7, dtype=torch.int64), torch.tensor(2.5), torch.empty(0, 5),
            torch.randn(6 << 18, generator=gen)[::2]]  # non-contiguous, 3 MiB once packed


def test_round_trip_is_bit_exact(sender):
    sent = tensors()
    ticket = sender.offer(sent)
    got = bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)
    assert len(got) == len(sent)
    for a, b in zip(got, sent):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert ticket.nbytes == sum(t.numel() * t.element_size() for t in sent)


def test_offer_is_a_snapshot(sender):
    weight = torch.ones(1000)
    ticket = sender.offer([weight])
    weight.mul_(3)  # the store changes after the offer: the peer gets what the digest describes
    assert torch.equal(bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)[0], torch.ones(1000))


def test_an_offer_is_taken_once(sender):
    ticket = sender.offer([torch.ones(10)])
    bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)
    with pytest.raises(WireError, match="ended after 0 of 40 bytes"):
        bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)
    assert sender.pending() == 0


def test_an_expired_offer_is_refused():
    s = BulkSender("127.0.0.1", 0, ttl_s=0.0).start()
    try:
        ticket = s.offer([torch.ones(10)])
        with pytest.raises(WireError, match="ended after 0"):
            bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)
        s.offer([torch.ones(1)])  # a later offer sweeps the expired one
        assert s.pending() == 1
    finally:
        s.close()


def test_corrupted_bytes_fail_the_digest(sender):
    ticket = sender.offer([torch.ones(100)])
    ticket.digest ^= 1
    with pytest.raises(WireError, match="digest mismatch"):
        bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)


@pytest.mark.parametrize("edit,fragment", [
    (lambda t: setattr(t, "nbytes", t.nbytes + 4), "announced for tensors of"),
    (lambda t: setattr(t.tensors[0], "dtype", "complex64"), "bad dtype"),
    (lambda t: t.tensors[0].shape.__setitem__(0, -1), "shape"),
    (lambda t: t.tensors[0].shape.__setitem__(0, 1 << 40), "over"),
    (lambda t: setattr(t, "token", b"short"), "announced"),
])
def test_a_malformed_ticket_is_refused_before_connecting(sender, edit, fragment):
    ticket = sender.offer([torch.ones(100)])
    edit(ticket)
    with pytest.raises(WireError, match=fragment):
        bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)
    assert sender.pending() == 1  # nothing was taken


def test_an_unreachable_side_channel_is_an_os_error(sender):
    ticket = sender.offer([torch.ones(100)])
    with socket.socket() as probe:  # bound, never listening: refused, and nobody else can take the port
        probe.bind(("127.0.0.1", 0))
        ticket.port = probe.getsockname()[1]
        with pytest.raises(OSError):
            bulk.receive("127.0.0.1", ticket, timeout=5, limit_bytes=LIMIT)


def test_unsupported_dtype_refused_on_offer(sender):
    with pytest.raises(WireError, match="cannot travel"):
        sender.offer([torch.ones(3, dtype=torch.complex64)])


def test_release_runs_once_after_the_send_on_expiry_and_on_close():
    calls = []
    s = BulkSender("127.0.0.1", 0).start()
    try:
        ticket = s.offer([torch.ones(10)], copy=False, release=lambda: calls.append("sent"))
        bulk.receive("127.0.0.1", ticket, timeout=10, limit_bytes=LIMIT)
        s.offer([torch.ones(10)], copy=False, release=lambda: calls.append("closed"))
    finally:
        s.close()
    expiring = BulkSender("127.0.0.1", 0, ttl_s=0.0).start()
    try:
        expiring.offer([torch.ones(1)], release=lambda: calls.append("expired"))
        expiring.offer([torch.ones(1)])  # sweeps the expired offer
    finally:
        expiring.close()
    assert sorted(calls) == ["closed", "expired", "sent"]
