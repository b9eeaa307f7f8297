"""The side-by-side evaluation harness (benchmarks/compare_baselines.py): scoring and a real-data run."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, SHARED_DATA

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import compare_baselines  # noqa: E402
from eval_datasets import OASIS  # noqa: E402


def _subject(label: np.ndarray) -> dict:
    return {"label_array": label, "affine": np.diag([2.0, 1.0, 1.0, 1.0])}


def test_score_perfect_shifted_and_absent_labels():
    label = np.zeros((20, 20, 20), np.int16)
    label[4:12, 4:12, 4:12], label[12:16, 4:12, 4:12] = 1, 2
    labels = {1: "a", 2: "b", 3: "absent"}
    row = compare_baselines.score(label, _subject(label), None, labels)
    assert row["dice_a"] == row["dice_b"] == 1.0 and np.isnan(row["dice_absent"])
    assert row["dice_mean"] == 1.0 and row["hd95_mm"] == 0.0 and row["folding_pct"] == 0.0
    shifted = np.roll(label, 1, axis=0)  # one voxel = 2 mm along the first axis
    jacobian = np.ones(label.shape)
    jacobian[0, 0, :4] = -1.0
    row = compare_baselines.score(shifted, _subject(label), jacobian, labels)
    assert row["dice_a"] == pytest.approx(2 * 7 / 16) and row["hd95_mm"] == pytest.approx(2.0)
    assert row["folding_pct"] == pytest.approx(100 * 4 / 8000) and row["sd_log_jacobian"] > 0


@pytest.mark.skipif(not (SHARED_DATA / "oasis" / "lapirn").is_dir(), reason="../shared/data/oasis absent")
def test_identity_and_report_on_oasis(tmp_path, monkeypatch):
    """Identity on both OASIS pairs writes one CSV row per pair with the dataset's label columns."""
    compare_baselines.run(OASIS(), tmp_path, ["identity"], [0], compare_baselines.DEFAULT_CKPT, None, ["inference.json"])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["pair"] for r in rows] == ["A_to_B", "B_to_A"]
    assert {"dice_label1", "dice_label2", "hd95_mm", "seconds"} <= set(rows[0])
    assert all(0.3 < float(r["dice_mean"]) < 1.0 for r in rows)  # both OASIS volumes share one template space
    compare_baselines.run(OASIS(), tmp_path, ["identity"], [0], compare_baselines.DEFAULT_CKPT, None, ["inference.json"])
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # resumed: nothing scored twice
    monkeypatch.setattr(compare_baselines, "REPO", tmp_path)  # report into tmp_path/docs
    compare_baselines.report(OASIS(), tmp_path)
    text = (tmp_path / "docs" / "results" / "baselines_oasis.md").read_text()
    assert "| identity | 2 |" in text
    assert (tmp_path / "docs" / "figures" / "baselines_oasis_A_to_B.png").is_file()


def test_config_overrides_parse_literals_and_strings():
    assert compare_baselines._override("pixdim=[2.0,2.0,2.0]") == ("pixdim", [2.0, 2.0, 2.0])
    assert compare_baselines._override("network_downsample=2") == ("network_downsample", 2)
    assert compare_baselines._override("instance_optimisation_residual=svf") == ("instance_optimisation_residual", "svf")
    with pytest.raises(SystemExit, match="ID=VALUE"):
        compare_baselines._override("pixdim")
