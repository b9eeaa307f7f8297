"""benchmarks/plot_regularisation.py: the trade-off figure's points are the per-λ means of the scoring scripts' rows."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import plot_regularisation  # noqa: E402

COLUMNS = ["method", "pair", "dice_mean", "folding_pct", "sd_log_jacobian", "seconds", "hardware"]


def _rows(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for method, pair, dice, folding, sdlogj in rows:
            writer.writerow({"method": method, "pair": pair, "dice_mean": dice, "folding_pct": folding,
                             "sd_log_jacobian": sdlogj, "seconds": 1.0, "hardware": "test"})


def test_points_are_the_per_lambda_means_of_one_method_family_sorted_by_lambda(tmp_path):
    path = tmp_path / "rows.csv"
    _rows(path, [("cond_l1", "a", 0.6, 0.0, 0.2), ("cond_l1", "b", 0.8, 0.002, 0.4), ("fixed_l0.3", "a", 0.5, 0, 0.3),
                 ("cond_l0.1", "a", 0.7, 0.01, 0.5)])
    points = plot_regularisation.tradeoff_points(path, "cond_l")
    assert [p["lambda"] for p in points] == [0.1, 1.0]
    assert points[1]["pairs"] == 2 and points[1]["dice"] == pytest.approx(0.7)
    assert points[1]["sd_log_jacobian"] == pytest.approx(0.3) and points[1]["folding_pct"] == pytest.approx(0.001)
    assert [p["dice"] for p in plot_regularisation.tradeoff_points(path, "fixed_l")] == [0.5]


@pytest.mark.parametrize("method, message", [("cond_lx", "does not end with a λ"), ("other", "no method named")])
def test_rows_without_a_lambda_are_refused_naming_the_file(tmp_path, method, message):
    path = tmp_path / "rows.csv"
    _rows(path, [(method, "a", 0.6, 0.0, 0.2)])
    with pytest.raises(ValueError, match=message) as error:
        plot_regularisation.tradeoff_points(path, "cond_l")
    assert str(path) in str(error.value)


def test_the_figure_is_drawn_from_both_data_sets_rows(tmp_path):
    pytest.importorskip("matplotlib")
    for dataset in plot_regularisation.DATASETS:
        _rows(tmp_path / f"lambda_test_{dataset}.csv", [(f"ours_l{w}", "a", 0.7 - w / 10, 0, 0.4 - w / 10)
                                                         for w in (0.03, 0.173, 1.0)])
        _rows(tmp_path / f"fixed_lambda_test_{dataset}.csv", [(f"{m}{w}", "a", 0.7, 0, 0.3) for m in ("cond_l", "fixed_l")
                                                               for w in (0.1, 1)])
    (tmp_path / plot_regularisation.CHOICE).write_text(json.dumps({"regularisation_weight": 0.173}))
    figure = plot_regularisation.plot(tmp_path, tmp_path / "out" / "tradeoff.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".*"))  # nothing half-written left beside it
    (tmp_path / "fixed_lambda_test_ibsr.csv").unlink()
    with pytest.raises(FileNotFoundError, match="fixed_lambda_test_ibsr.csv"):
        plot_regularisation.plot(tmp_path, tmp_path / "out" / "again.png")
