"""The one flock helper: sync's locks and forget's hold on sync's push lock."""

from __future__ import annotations

import os

import pytest

from har_edge.agent.forget import ForgetError, push_lock
from har_edge.agent.watcher import SYNC_PUSH_LOCK, held_elsewhere
from har_edge.sync.errors import LockBusy
from har_edge.sync.locks import file_lock


def test_a_held_lock_times_out_with_each_callers_own_error(tmp_path):
    lock = tmp_path / SYNC_PUSH_LOCK
    assert not held_elsewhere(lock)
    with file_lock(lock, timeout_s=5):  # what a sync push pass holds
        assert held_elsewhere(lock)
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(LockBusy, match="held by another sync process"), file_lock(lock, timeout_s=0.3):
            pass
        with pytest.raises(ForgetError, match="held by a sync push for over 0 s"), push_lock(tmp_path, 0.3):
            pass
    assert not held_elsewhere(lock)
    with push_lock(tmp_path, 1.0):  # free again: forget gets it at once
        assert held_elsewhere(lock)
