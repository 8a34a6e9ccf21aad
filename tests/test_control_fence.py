"""Fenced changes on the control topic: a change is made from the state in force and names
it; one made from a state that another change replaced meanwhile applies nowhere, and
its publisher is told. Two operators at once, or a controller that read the rollout
before someone aborted it, cannot overwrite a change they did not see."""

from __future__ import annotations

import dataclasses
import time

import pytest

from fraudstream.schemas.control import (
    APPLIED,
    REPEATED,
    SUPERSEDED,
    ControlError,
    ControlRecord,
    Heads,
    decode,
    is_audit,
)
from fraudstream.scorers.canary import Gates, Rollout, Step
from fraudstream.scorers.rules import DEFAULT_RULES_PATH, RuleSet
from fraudstream.scorers.rules_file import inline_document, read_toml
from fraudstream.streams.control.follow import ControlFollower
from fraudstream.streams.control.rollout import Controller, publish_rollout
from fraudstream.streams.control.topic import (
    Superseded,
    control_consumer,
    latest,
    publish,
    read_to_end,
)
from tests.conftest import T0_MS
from tests.test_control import cli


def rules(version: str, at: int, by: str = "ana@ops") -> ControlRecord:
    """A rules change a worker applies: the default rules under another version."""
    document = inline_document(read_toml(DEFAULT_RULES_PATH), DEFAULT_RULES_PATH.parent)
    return ControlRecord.make("rules", version, {**document, "version": version}, by, at,
                              f"set {version}")


def test_a_fenced_change_applies_only_over_the_state_it_was_made_from():
    heads = Heads()
    r1 = rules("r1", T0_MS)  # unfenced: written before fencing, or by hand
    assert heads.offer(r1) == APPLIED
    a, b = rules("a", T0_MS + 1).after(r1), rules("b", T0_MS + 2).after(r1)
    assert heads.offer(a) == APPLIED
    assert heads.offer(b) == SUPERSEDED  # made from r1, which a replaced
    assert heads.get("rules") == a
    assert heads.offer(rules("first", T0_MS + 3).after(None)) == SUPERSEDED  # one exists
    assert heads.offer(a) == REPEATED
    c = rules("c", T0_MS + 4).after(a)
    assert heads.offer(c) == APPLIED and heads.get("rules") == c
    # kinds are fenced each on its own
    model = ControlRecord.make("model", "v1", {"active": "v1", "shadow": None}, "ops",
                               T0_MS + 5, "first model").after(None)
    assert heads.offer(model) == APPLIED and heads.get("rules") == c
    # the fence travels in the record; an unfenced record carries none
    assert decode(c.encode()) == c and decode(c.encode()).prev == a.ref()
    assert b'"prev"' not in r1.encode() and decode(r1.encode()).prev is None
    assert decode(model.encode()).prev == ""
    with pytest.raises(ControlError, match="prev"):
        decode(c.encode().replace(f'"prev":"{a.ref()}"'.encode(), b'"prev":5'))


@pytest.mark.e2e
def test_the_second_of_two_publishers_from_one_state_is_superseded_everywhere(
        stack_settings):
    settings = stack_settings
    publish(settings, rules("r1", T0_MS).after(latest(settings, "rules")))
    seen = latest(settings, "rules")
    assert seen is not None and seen.version == "r1"
    running = ControlFollower(settings, models=False)  # a worker already running
    assert running.initial(RuleSet.default()).ruleset.version == "r1"
    running.start()
    try:
        # Two analysts read r1 and each publish their change from it.
        publish(settings, rules("from-ana", T0_MS + 1, "ana@ops").after(seen))
        with pytest.raises(Superseded, match="from-ana by ana@ops") as exc:
            publish(settings, rules("from-bo", T0_MS + 2, "bo@ops").after(seen))
        assert exc.value.head is not None and exc.value.head.version == "from-ana"
        # The running worker takes ana's change and refuses bo's (counted: the alert).
        deadline = time.monotonic() + 10
        while running.refused["rules"] < 1:
            assert time.monotonic() < deadline, running.applied
            time.sleep(0.1)
        assert running.applied == ["r1", "from-ana"] and running.refused["rules"] == 1
    finally:
        running.stop()
    # The state key holds the last record written (bo's); every reader replays the
    # audit records, so none takes bo's change. A worker that starts now does not count
    # the history's superseded change again (each restart would raise the alert).
    assert latest(settings, "rules").version == "from-ana"
    follower = ControlFollower(settings, models=False)
    try:
        assert follower.initial(RuleSet.default()).ruleset.version == "from-ana"
        assert follower.refused["rules"] == 0
    finally:
        follower.stop()
    # Bo reads again and publishes from what is in force: it applies.
    publish(settings, rules("from-bo", T0_MS + 3, "bo@ops").after(latest(settings, "rules")))
    assert latest(settings, "rules").version == "from-bo"
    out = cli(settings, "history")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [("superseded" in line) for line in lines] == [False, False, True, False], lines
    assert "from-bo" in lines[2] and "bo@ops" in lines[2]


def _running_rollout(settings) -> Rollout:  # noqa: ANN001
    """Champion v0 in force, and a rollout of v1 against it at its first step."""
    publish(settings, ControlRecord.make("model", "v0", {"active": "v0", "shadow": None},
                                         "ops", T0_MS, "champion").after(None))
    running = Rollout(rollout=f"v1@{T0_MS}", version="v1", champion="v0",
                      steps=(Step(0.1, 60.0), Step(1.0, 0.0)), gates=Gates(), step=0,
                      step_started_at=T0_MS)
    publish_rollout(settings, running, "ana@ops", "canary of v1", latest(settings, "canary"))
    return running


def _controller_that_read(settings) -> Controller:  # noqa: ANN001
    """A controller (its clock just after T0) that read the control topic to its end."""
    controller = Controller(settings, clock=lambda: (T0_MS + 2) / 1000)
    consumer = control_consumer(settings, "test-controller")
    try:
        for msg in read_to_end(consumer, 30.0):
            controller._read(msg)
    finally:
        consumer.close()
    return controller


@pytest.mark.e2e
def test_a_controller_that_read_a_rollout_before_an_abort_does_not_move_it(stack_settings):
    settings = stack_settings
    running = _running_rollout(settings)
    controller = _controller_that_read(settings)
    assert controller.rollout == running
    # The controller stalls; meanwhile an operator aborts the rollout.
    aborted = running.moved(T0_MS + 1, status="aborted")
    publish_rollout(settings, aborted, "bo@ops", "abort: complaints",
                    latest(settings, "canary"))
    # It wakes and moves the rollout from what it read: the move applies nowhere.
    controller._move(running.moved(T0_MS + 2, step=1), "step 1 passed")
    in_force = latest(settings, "canary")
    assert in_force is not None and Rollout.from_document(in_force.document) == aborted
    assert controller.rollout == running  # not the move: it judges again from the topic
    # Nor does a promotion: the aborted canary never becomes the active version.
    controller._move(running.moved(T0_MS + 3, status="promoted", step=1), "promoted")
    assert latest(settings, "model").document["active"] == "v0"
    assert Rollout.from_document(latest(settings, "canary").document) == aborted


@pytest.mark.e2e
def test_a_rollout_whose_champion_was_replaced_by_hand_is_aborted_not_judged(stack_settings):
    settings = stack_settings
    running = _running_rollout(settings)
    # Published while the rollout runs (the CLI refuses it, but it raced the canary's
    # start, or came from an older release): v9 is now the active version.
    publish(settings, ControlRecord.make("model", "v9", {"active": "v9", "shadow": None},
                                         "bo@ops", T0_MS + 1, "hotfix model"))
    controller = _controller_that_read(settings)
    moved = controller._baseline_moved(running)
    assert moved is not None and moved[0].status == "aborted" and "v9" in moved[1]
    controller._move(*moved)
    in_force = latest(settings, "canary")
    assert in_force is not None and Rollout.from_document(in_force.document).status == \
        "aborted"
    assert latest(settings, "model").version == "v9"  # the promotion never overwrote it
    # A rollout whose canary is already the active version (a promotion whose rollout
    # record was not written) is promoted, without a second model state.
    again = controller._baseline_moved(dataclasses.replace(running, version="v9"))
    assert again is not None and again[0].status == "promoted"


@pytest.mark.e2e
def test_a_promotion_is_written_rollout_first_so_an_abort_never_leaves_the_canary_active(
        stack_settings):
    """The promotion's rollout record goes first: an abort made from the running rollout
    is then superseded (its operator told), so no aborted canary is ever made active. A
    controller stopped before the model state was written has it finished by the next one
    that reads the topic; a champion put back by hand afterwards is not undone."""
    settings = stack_settings
    running = _running_rollout(settings)
    running_record = latest(settings, "canary")
    promoted = running.moved(T0_MS + 2, status="promoted", step=1)
    publish_rollout(settings, promoted, "fraudstream-controller", "every step passed",
                    running_record)
    # (the controller stops here, before the model state)
    with pytest.raises(Superseded):
        publish_rollout(settings, running.moved(T0_MS + 3, status="aborted"), "bo@ops",
                        "abort: complaints", running_record)
    assert latest(settings, "model").document["active"] == "v0"

    controller = _controller_that_read(settings)
    assert controller.rollout == promoted and controller._unfinished(promoted)
    controller._finish(promoted)
    assert latest(settings, "model").document == {"active": "v1", "shadow": None}
    assert not _controller_that_read(settings)._unfinished(promoted)

    # The champion put back by hand after the promotion stays.
    publish(settings, ControlRecord.make("model", "v0", {"active": "v0", "shadow": None},
                                         "sre@ops", T0_MS + 4, "v1 declines too much"
                                         ).after(latest(settings, "model")))
    assert not _controller_that_read(settings)._unfinished(promoted)


@pytest.mark.e2e
def test_the_controller_promotes_with_the_rollout_record_first(stack_settings):
    from fraudstream.streams.control.rollout import promote

    settings = stack_settings
    running = _running_rollout(settings)
    promote(settings, running.moved(T0_MS + 2, status="promoted", step=1), "passed",
            latest(settings, "canary"))
    consumer = control_consumer(settings, "test-order")
    try:
        kinds = [decode(m.value()).kind for m in read_to_end(consumer, 30.0)
                 if is_audit(m.key())]
    finally:
        consumer.close()
    assert kinds == ["model", "canary", "canary", "model"]
    assert latest(settings, "model").document == {"active": "v1", "shadow": None}


@pytest.mark.e2e
def test_a_model_state_published_between_a_promotions_two_writes_leaves_the_rollout_aborted(
        stack_settings):
    """The hand-published model state stands (fenced), and the rollout's record says the
    promotion did not take effect, rather than promoted with another version active."""
    from fraudstream.streams.control.rollout import _activate, _activation

    settings = stack_settings
    running = _running_rollout(settings)
    champion_state = latest(settings, "model")
    promoted = running.moved(T0_MS + 2, status="promoted", step=1)
    publish_rollout(settings, promoted, "fraudstream-controller", "every step passed",
                    latest(settings, "canary"))
    # between the controller's two writes, a model state published by hand
    publish(settings, ControlRecord.make("model", "v9", {"active": "v9", "shadow": None},
                                         "bo@ops", T0_MS + 3, "hotfix model"
                                         ).after(champion_state))
    with pytest.raises(Superseded):
        _activate(settings, promoted, _activation(promoted, "every step passed",
                                                  champion_state))
    assert latest(settings, "model").document["active"] == "v9"
    record = latest(settings, "canary")
    assert record is not None and Rollout.from_document(record.document).status == "aborted"
    assert "v9 is active" in record.reason and "did not take effect" in record.reason
    # and a controller reading the topic now finishes nothing
    controller = _controller_that_read(settings)
    assert controller.rollout is not None and controller.rollout.status == "aborted"
    assert not controller._unfinished(controller.rollout)
