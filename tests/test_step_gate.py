"""StepGate: a paused routing table is acknowledged only between training steps, and no step starts while paused."""

import threading
import time

import pytest
from moecluster.frontend.step_gate import StepGate


def test_between_steps_a_paused_table_is_acknowledged_at_once():
    gate, acks = StepGate(), []
    gate.on_table(True, lambda: acks.append(1))
    assert acks == [1]


def test_inside_a_step_the_acknowledgement_waits_for_its_end():
    gate, acks = StepGate(), []
    gate.enter(timeout=1)
    gate.enter(timeout=1)  # the step's later forwards: already inside
    gate.on_table(True, lambda: acks.append("paused"))
    assert acks == [] and gate.in_step
    gate.leave()
    assert acks == ["paused"] and not gate.in_step
    gate.leave()
    assert acks == ["paused"], "acknowledged once"


def test_an_unpaused_table_is_acknowledged_even_inside_a_step():
    gate, acks = StepGate(), []
    gate.enter(timeout=1)
    gate.on_table(True, lambda: acks.append("paused"))
    gate.on_table(False, lambda: acks.append("resumed"))  # the copy is over: a newer epoch covers the older
    assert acks == ["resumed"]
    gate.leave()
    assert acks == ["resumed"]


def test_no_step_starts_while_paused():
    gate, started = StepGate(), threading.Event()
    gate.on_table(True, lambda: None)
    thread = threading.Thread(target=lambda: (gate.enter(timeout=5), started.set()), daemon=True)
    thread.start()
    time.sleep(0.1)
    assert not started.is_set()
    gate.on_table(False, lambda: None)
    assert started.wait(2) and gate.in_step
    thread.join(timeout=2)


def test_a_pause_that_never_lifts_is_a_timeout_with_a_reason():
    gate = StepGate()
    gate.on_table(True, lambda: None)
    with pytest.raises(TimeoutError, match="paused"):
        gate.enter(timeout=0.1)
