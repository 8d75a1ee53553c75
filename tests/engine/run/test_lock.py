"""One driver per run directory (engine/run/lock.py): a second driver is refused, naming the
holder and how to clear the lock; a lock left by a dead driver is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from codelens.engine.errors import RunDirError
from codelens.engine.run.lock import LOCK_NAME, DriverLock


def test_a_second_driver_is_refused_with_the_holder_named(tmp_path):
    with DriverLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] > 0 and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirError) as info:
            DriverLock(tmp_path).__enter__()
        message = str(info.value)
        assert f"pid {holder['pid']} on host {socket.gethostname()}" in message
        assert f"delete {tmp_path / LOCK_NAME}" in message
    # Released: emptied (never deleted), and free for the next driver.
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with DriverLock(tmp_path) as lock:
        assert lock.took_over is None


def test_a_second_driver_in_another_process_is_refused(tmp_path):
    code = (
        "import sys; from codelens.engine.run.lock import DriverLock\n"
        "try:\n    DriverLock(sys.argv[1]).__enter__()\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    with DriverLock(tmp_path):
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
        ).stdout
    assert out.startswith("RunDirError") and "is being run by pid" in out


def test_a_stale_lock_of_a_dead_driver_is_taken_over(tmp_path, caplog, dead_pid):
    stale = {
        "host": socket.gethostname(),
        "pid": dead_pid,
        "started": "2026-01-01T00:00:00+00:00",
    }
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with caplog.at_level("WARNING"), DriverLock(tmp_path) as lock:
        assert lock.took_over == stale
        assert "taking over a stale lock" in caplog.text
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != stale["pid"]


def test_a_lock_naming_another_host_is_refused(tmp_path):
    other = {"host": "node-17.example", "pid": 4242, "started": "2026-12-01T10:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunDirError, match="pid 4242 on host node-17.example.*another host"):
        DriverLock(tmp_path).__enter__()
    # Refusing does not touch the other driver's lock.
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other
