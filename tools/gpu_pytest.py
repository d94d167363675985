"""pytest plugin of tools/gpu_check.sh (step b): a time box that ends a test run cleanly.

    PYTHONPATH=tools pytest -p gpu_pytest --gpu-deadline-at "$(( $(date +%s) + 150 ))" ...

From that time (seconds since the epoch, so that the interpreter's start and the collection count
too) no further test starts: every remaining test is reported as skipped with the reason, so the
run ends on its own with its junit XML written and its counts honest (a run killed by `timeout`
would leave no report at all). With the time box, the kernel tests run first and the whole-model
tests (tests/test_models_*, which compile whole models on a GPU) last, so that a short box spends
itself on the kernels.
"""
import signal
import time

import pytest

_state = {"deadline": None}
LAST = ("test_models_", "test_workflows")


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-deadline-at",
        type=float,
        default=None,
        help="start no test after this time (seconds since the epoch); the rest are skipped with the reason",
    )


def pytest_configure(config):
    _state["deadline"] = config.getoption("--gpu-deadline-at")
    if _state["deadline"] is not None:
        # gpu_check.sh ends an overrunning run with SIGINT, on which pytest still writes its reports;
        # a shell that started this one in the background may have left SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(session, config, items):
    if _state["deadline"] is not None:
        items.sort(key=lambda item: any(part in item.nodeid for part in LAST))  # stable: otherwise as collected


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _state["deadline"] is not None and time.time() > _state["deadline"]:
        pytest.skip("gpu_check time box: not started, the step's time was used up")
