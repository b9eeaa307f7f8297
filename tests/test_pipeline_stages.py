"""benchmarks/pipeline_stages.py: every stage of the real inference config timed on a pair, the totals and the
peers' ratio in the summary (a fake peer; the real peers are tested with compare_baselines)."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import compare_baselines  # noqa: E402
import pipeline_stages  # noqa: E402
from bundle.data.evaluation import _write  # noqa: E402

_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _blob(name: str, shift: float, work):
    i = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"))
    r2 = sum(((i[k] - c) / s) ** 2 for k, (c, s) in enumerate(((15.5 + shift, 7), (15.5, 6), (15.5, 5))))
    return _write(name, np.exp(-r2 / 2), (r2 < 1).astype(np.int16), _AFFINE, work)


class Tiny:
    testing, labels = ["moving", "fixed"], {1: "blob"}

    def subject(self, name, work):
        return _blob(name, 3.0 if name == "moving" else 0.0, work)


def test_every_stage_is_timed_and_summarised(tmp_path, monkeypatch):
    monkeypatch.setitem(compare_baselines.RUNNERS, "fake_peer", lambda m, f, work: (f["label_array"], None, 2.5))
    summary = pipeline_stages.run(Tiny(), tmp_path, compare_baselines.DEFAULT_CKPT, ["inference.json"], None,
                                  ["fake_peer"], {"prealign": "none"})
    with open(tmp_path / "stages.csv") as fh:
        rows = list(csv.DictReader(fh))
    pairs = {r["pair"] for r in rows}
    assert pairs == {"moving_to_fixed", "fixed_to_moving"}
    stages = [r["stage"] for r in rows if r["pair"] == "moving_to_fixed"]
    for expected in ("pre:LoadImaged", "pre:PreAlignd", "pre:PerKeySpacingd", "network", "post:ResampleDDFToOriginald",
                     "post:ComposePreAlignmentd", "post:Warpd", "post:JacobianDeterminantd", "post:SaveNiftid",
                     "post:CommitOutputsd", "total", "peer:fake_peer"):
        assert expected in stages, (expected, stages)
    for pair in pairs:
        timed = [float(r["seconds"]) for r in rows if r["pair"] == pair and ":" in r["stage"] and not r["stage"].startswith("peer")]
        network = [float(r["seconds"]) for r in rows if r["pair"] == pair and r["stage"] == "network"]
        total = [float(r["seconds"]) for r in rows if r["pair"] == pair and r["stage"] == "total"]
        assert all(t >= 0 for t in timed) and abs(sum(timed) + network[0] - total[0]) < 1e-9
        cpu = [float(r["cpu_seconds"]) for r in rows if r["pair"] == pair and r["stage"] not in ("total",) and not r["stage"].startswith("peer")]
        cpu_total = [float(r["cpu_seconds"]) for r in rows if r["pair"] == pair and r["stage"] == "total"]
        assert all(c >= 0 for c in cpu) and abs(sum(cpu) - cpu_total[0]) < 1e-9 and cpu_total[0] > 0
    assert (tmp_path / "outputs" / "moving_to_fixed" / "ddf.nii.gz").is_file()  # the real pipeline ran
    by_stage = {r["stage"]: r for r in summary}
    assert by_stage["peer:fake_peer"]["median_seconds"] == 2.5
    assert by_stage["peer:fake_peer"]["median_cpu_seconds"] == "" and by_stage["total"]["median_cpu_seconds"] > 0
    # the ratio is taken before the median is rounded for the table: equal to the rounded figures within a unit of the last place
    assert by_stage["peer:fake_peer"]["ratio_to_ours"] == pytest.approx(2.5 / by_stage["total"]["median_seconds"], abs=0.011)
    assert all(r["pairs"] == 2 and r["hardware"] for r in summary)
