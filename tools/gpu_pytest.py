"""pytest plugin of tools/gpu_check.sh (step b): a time box that ends a test run cleanly.

    pytest -p tools.gpu_pytest --gpu-deadline-s 150 ...

After the given seconds no further test starts: every remaining test is reported as skipped with
the reason, so the run ends on its own with its junit XML written and its counts honest (a run
killed by `timeout` would leave no report at all).
"""
import time

import pytest

_state = {"start": None, "deadline_s": None}


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-deadline-s",
        type=float,
        default=None,
        help="start no test after this many seconds; the rest are skipped with the reason (tools/gpu_check.sh)",
    )


def pytest_configure(config):
    _state["start"] = time.monotonic()
    _state["deadline_s"] = config.getoption("--gpu-deadline-s")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    limit = _state["deadline_s"]
    if limit is not None and time.monotonic() - _state["start"] > limit:
        pytest.skip(f"gpu_check time box: not started, the run's {limit:g} s were used up")
