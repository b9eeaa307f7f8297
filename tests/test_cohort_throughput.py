"""benchmarks/cohort_throughput.py: completion times of the inference command over a cohort, with and without a
DataLoader worker (the same outputs either way)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT, write_random_registration_checkpoint

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import cohort_throughput  # noqa: E402
import compare_baselines  # noqa: E402
from test_choose_regularisation import TinyValidation  # noqa: E402


def test_the_steady_state_excludes_the_first_pair():
    row = cohort_throughput.summarise(1, [5.0, 6.0, 8.0, 9.0])
    assert row == {"num_workers": 1, "pairs": 4, "first_pair_seconds": 5.0, "median_seconds_per_pair": 1.0,
                   "mean_seconds_per_pair": pytest.approx(4 / 3, abs=1e-3)}


def test_every_pair_completes_with_and_without_a_worker(tmp_path):
    ckpt = write_random_registration_checkpoint(tmp_path / "plain.pt")
    pairs = compare_baselines.split_pairs(TinyValidation(), "validation", tmp_path / "inputs")
    for workers in (0, 1):
        work = tmp_path / f"w{workers}"
        work.mkdir()
        times = cohort_throughput.completion_times(pairs, work, ckpt, ["inference.json", "registration_only.json"],
                                                   workers, {"prealign": "none"})
        assert len(times) == len(pairs) == 2 and times[0] < times[1]
        assert sorted(p.name for p in (work / "out").iterdir()) == ["a_to_b", "b_to_a"]
