"""Starting the selector's local Ray node: a node that times out during startup is torn down and started again.

Ray gives a new raylet a fixed 30 s to register with the GCS; on a loaded 2-core machine that has run out
(CI). These tests stand in for `ray.init` with a function that starts a real child process — as a failed
node leaves its GCS and raylet behind — and then fails the way Ray does.
"""

import logging
import subprocess
import sys
import time

import psutil
import pytest
import ray

from llm_selector import serve_app

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the "
                    "raylet failed to startup or the GCS has become overloaded.")


class FlakyInit:
    """`ray.init` that starts a lingering child process and raises `errors[i]` on call i (None: succeeds)."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.children: list[subprocess.Popen] = []

    def __call__(self, **kwargs):
        self.children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        error = self.errors.pop(0)
        if error is not None:
            raise error

    def cleanup(self):
        for child in self.children:
            child.kill()
            child.wait()


@pytest.fixture
def flaky_init(monkeypatch):
    made = []

    def make(*errors):
        made.append(FlakyInit(*errors))
        monkeypatch.setattr(ray, "init", made[-1])
        return made[-1]

    yield make
    for init in made:
        init.cleanup()


def test_a_node_that_times_out_is_killed_and_started_again(flaky_init, caplog):
    init = flaky_init(TIMEOUT, TIMEOUT, None)
    with caplog.at_level(logging.WARNING, logger="s2t.selector"):
        serve_app.start_local_ray(attempts=3)
    failed, started = init.children[:2], init.children[2]
    assert all(child.wait(timeout=10) is not None for child in failed), "the failed nodes' processes are stopped"
    assert started.poll() is None and psutil.pid_exists(started.pid), "the node that came up is left running"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "1/3 timed out" in warnings[0] and "2/3 timed out" in warnings[1]
    assert "stopped its 1 processes" in warnings[0]


def test_the_last_attempt_raises_rays_error(flaky_init):
    init = flaky_init(TIMEOUT, TIMEOUT)
    with pytest.raises(Exception, match="timed out during startup"):
        serve_app.start_local_ray(attempts=2)
    assert len(init.children) == 2


def test_other_errors_are_not_retried(flaky_init):
    init = flaky_init(ValueError("System config parameters can only be set on the head node."), None)
    with pytest.raises(ValueError, match="head node"):
        serve_app.start_local_ray(attempts=3)
    assert len(init.children) == 1, "a configuration error is not retried"


class SkewedClock:
    """ray/_private/node.py's `time` module, moved 31 s on by each refused node lookup (past Ray's 30 s wait)."""

    def __init__(self):
        self.skew = 0.0

    def __getattr__(self, name):
        return getattr(time, name)

    def monotonic(self):
        return time.monotonic() + self.skew


@pytest.mark.ray
def test_a_real_node_that_never_registers_is_replaced(monkeypatch):
    """A real first node whose raylet 'never registers' (the GCS lookup refused past Ray's wait): its GCS and
    raylet are killed, and a second real node starts in the same process."""
    import ray._private.node as ray_node
    import ray._private.services as ray_services

    clock, real_get_node, refusals = SkewedClock(), ray_services.get_node, [1]

    def get_node(*args, **kwargs):
        if refusals[0]:
            refusals[0] -= 1
            clock.skew += 31
            raise RuntimeError("node info not available (refused by the test)")
        return real_get_node(*args, **kwargs)

    monkeypatch.setattr(ray_services, "get_node", get_node)
    monkeypatch.setattr(ray_node, "time", clock)
    assert not ray.is_initialized()
    try:
        serve_app.start_local_ray(attempts=2)
        assert ray.is_initialized() and refusals == [0]
        raylets = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("raylet")]
        assert len(raylets) == 1, f"the first node's raylet is gone, the second's runs: {raylets}"
        assert ray.get(ray.remote(lambda: 42).remote()) == 42
    finally:
        ray.shutdown()
