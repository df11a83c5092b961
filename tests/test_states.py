import json

import pytest

from daemon.states import (JOB_TRANSITIONS, SERVICE_TRANSITIONS, JobState, ServiceStatus, check_transition)


def test_states_serialise_as_plain_strings():
    assert json.dumps({"s": ServiceStatus.PAUSED}) == '{"s": "paused"}'
    assert {s.value for s in ServiceStatus} == {"idle", "training", "paused", "stopping", "stopped", "error"}


def test_every_state_has_a_transition_row():
    assert set(SERVICE_TRANSITIONS) == set(ServiceStatus)
    assert set(JOB_TRANSITIONS) == set(JobState)


def test_transitions_checked():
    check_transition(JOB_TRANSITIONS, JobState.PENDING, JobState.PROCESSING)
    check_transition(JOB_TRANSITIONS, JobState.FAILED, JobState.PENDING)
    with pytest.raises(ValueError, match="'done' -> 'pending'"):
        check_transition(JOB_TRANSITIONS, JobState.DONE, JobState.PENDING)
    with pytest.raises(ValueError):
        check_transition(SERVICE_TRANSITIONS, ServiceStatus.STOPPED, ServiceStatus.TRAINING)
