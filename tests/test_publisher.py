"""The routing-table publisher: who await_acks waits for (watching, reconnecting, after a restart)."""

import threading
import time

from moecluster.controller.publisher import Publisher

LEASE = 0.4
PLACEMENT = {(0, 0): ("w0",)}
ADDRESSES = {"w0": "127.0.0.1:1"}


def watcher(pub: Publisher, frontend: str, acks: bool = True, trainer: bool = False):
    """A frontend watching on a thread; acknowledges every table it gets (if `acks`); stop() ends its stream."""
    alive = threading.Event()
    alive.set()
    got = []

    def run():
        for table in pub.watch(frontend, 0, alive.is_set, trainer):
            got.append(table.epoch)
            if acks:
                pub.ack(frontend, table.epoch)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while frontend not in pub.frontends() and time.monotonic() < deadline:
        time.sleep(0.01)

    def stop():
        alive.clear()
        thread.join(timeout=5)

    return got, stop


def test_no_frontend_means_nothing_to_wait_for():
    pub = Publisher(lease_s=LEASE)
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    start = time.monotonic()
    assert pub.await_acks(epoch, timeout=5) == []
    assert time.monotonic() - start < LEASE  # a fresh controller has no one to wait for


def test_waits_for_a_watching_frontend_to_ack():
    pub = Publisher(lease_s=LEASE)
    got, stop = watcher(pub, "f1")
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    assert pub.await_acks(epoch, timeout=5) == []
    assert got == [epoch]
    stop()


def test_a_silent_frontend_is_reported_lagging():
    pub = Publisher(lease_s=LEASE)
    _, stop = watcher(pub, "mute", acks=False)
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    assert pub.await_acks(epoch, timeout=0.3) == ["mute"]
    stop()


def test_a_wait_among_some_frontends_is_not_held_by_a_silent_other():
    """A pause waits for the trainers only: a hung frontend (or a data-parallel member) must not hold it."""
    pub = Publisher(lease_s=LEASE)
    _, stop_mute = watcher(pub, "mute", acks=False)
    _, stop_trainer = watcher(pub, "trainer", trainer=True)
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    start = time.monotonic()
    assert pub.await_acks(epoch, timeout=5, among=["trainer"]) == [] and time.monotonic() - start < 1
    assert pub.await_acks(epoch, timeout=0.3, among=["trainer", "mute"]) == ["mute"]
    stop_mute()
    stop_trainer()


def test_a_reconnecting_frontend_is_waited_for_until_it_acks():
    pub = Publisher(lease_s=5.0)
    _, stop = watcher(pub, "f1")
    stop()  # its stream broke: it still routes by whatever it had
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    assert pub.await_acks(epoch, timeout=0.3) == ["f1"]  # not forgotten with its stream
    got, stop = watcher(pub, "f1")  # it comes back and catches up
    assert pub.await_acks(epoch, timeout=5) == [] and got == [epoch]
    stop()


def test_a_frontend_gone_for_a_lease_is_no_longer_waited_for():
    pub = Publisher(lease_s=LEASE)
    _, stop = watcher(pub, "f1")
    stop()
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    start = time.monotonic()
    assert pub.await_acks(epoch, timeout=5) == []
    assert LEASE * 0.5 <= time.monotonic() - start < 5  # it waited for the lease, not the whole timeout


def test_a_restarted_controller_waits_a_lease_for_frontends_it_never_saw():
    pub = Publisher(lease_s=1.0)
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    pub.expect_reconnects()
    done = []
    waiter = threading.Thread(target=lambda: done.append(pub.await_acks(epoch, timeout=10)), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert not done  # still warming up
    got, stop = watcher(pub, "old-frontend")  # reconnects during the warm-up: must ack before any drop
    waiter.join(timeout=10)
    assert done == [[]] and got == [epoch]
    stop()


def test_trainers_are_known_while_watching_and_for_a_lease_after():
    pub = Publisher(lease_s=LEASE)
    pub.publish(PLACEMENT, ADDRESSES)
    _, stop_frontend = watcher(pub, "frontend-1")
    _, stop_trainer = watcher(pub, "trainer-1", trainer=True)
    assert pub.trainers() == ["trainer-1"]
    paused = pub.publish(PLACEMENT, ADDRESSES, paused=True)
    assert paused.paused and not pub.publish(PLACEMENT, ADDRESSES).paused
    stop_trainer()
    assert pub.trainers() == ["trainer-1"], "a broken stream is most likely a trainer reconnecting"
    time.sleep(LEASE * 1.5)
    assert pub.trainers() == []
    stop_frontend()


def test_a_frontend_or_trainer_that_says_it_leaves_is_waited_for_no_more_until_it_watches_again():
    pub = Publisher(lease_s=5.0)
    epoch = pub.publish(PLACEMENT, ADDRESSES).epoch
    _, stop_frontend = watcher(pub, "f1", acks=False)
    _, stop_trainer = watcher(pub, "t1", acks=False, trainer=True)
    pub.leave("f1")  # before its stream ends: neither waited for now nor given a lease after
    stop_frontend()
    stop_trainer()
    pub.leave("t1")  # after its stream ended: its lease is dropped
    assert pub.trainers() == [] and pub.frontends() == {}
    start = time.monotonic()
    assert pub.await_acks(epoch, timeout=3) == [] and time.monotonic() - start < 1
    got, stop = watcher(pub, "f1", acks=False)  # back: waited for again
    assert pub.await_acks(epoch, timeout=0.3) == ["f1"] and got == [epoch]
    stop()
