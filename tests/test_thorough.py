"""The fixed-seed CI slice of the thorough property profile (tests/thorough.py; the full profile,
>= 1000 shapes per op per CPU backend, is `make test-thorough`): a few dozen random shapes per op
and backend, forward and backward, with zero mismatches."""
import re

import pytest

from tests import thorough

CI_COUNT, CI_TRITON_COUNT, CI_SEED = 30, 3, 2026


@pytest.mark.parametrize("op", thorough.OPS)
def test_thorough_slice(op):
    tallies = thorough.run_profile(CI_COUNT, CI_TRITON_COUNT, seed=CI_SEED, ops=[op], show_progress=False)
    assert {backend for _, backend in tallies} >= {"cpu", "reference"}
    for (_, backend), tally in tallies.items():
        assert tally.shapes == (CI_TRITON_COUNT if backend == "triton" else CI_COUNT)
    failures = [f"{op} {backend} case {i}: {message[:400]}"
                for (_, backend), tally in tallies.items() for i, message in tally.failures]
    assert not failures, "\n".join(failures)


def test_profile_counts_and_reports_a_mismatch(monkeypatch, capsys):
    """The runner counts every shape, and a wrong backend is a mismatch with a reproducible line."""
    real = thorough.CASES["dan_head_fusion"]

    def wrong_on_cpu(rng, backend):
        desc = real(rng, backend)
        if backend == "cpu":
            raise AssertionError(f"{desc}: injected")
        return desc

    monkeypatch.setitem(thorough.CASES, "dan_head_fusion", wrong_on_cpu)
    assert thorough.main(["--count", "3", "--triton-count", "1", "--ops", "dan_head_fusion", "--seed", "4"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^dan_head_fusion\s+cpu\s+3\s+3\s", out, re.M), out
    assert "FAIL dan_head_fusion cpu case 0 (--seed 4 --ops dan_head_fusion --first 0 --count 1)" in out
