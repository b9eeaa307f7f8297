"""benchmarks/choose_refinement.py: the refinement settings chosen on validation pairs (highest Dice averaged over
the data sets, within a folding limit on each), through the bundle's own inference config."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from conftest import REPO_ROOT, write_random_registration_checkpoint

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import choose_refinement as chooser  # noqa: E402
from test_choose_regularisation import TinyValidation  # noqa: E402


def test_the_grid_holds_the_network_alone_once_and_every_refinement_combination():
    grid = chooser.settings_grid([0, 10, 20], [0.1], [0.5, 1.0], ["ddf", "svf"])
    assert grid[0] == {"steps": 0} and len(grid) == 1 + 2 * 1 * 2 * 2
    assert len({chooser.method_name(s) for s in grid}) == len(grid)
    assert chooser.overrides(grid[0]) == {"instance_optimisation_steps": 0}
    assert chooser.overrides(grid[1]) == {"instance_optimisation_steps": 10, "instance_optimisation_lr": 0.1,
                                          "instance_optimisation_smoothness": 0.5, "instance_optimisation_residual": "ddf"}


def _rows(name, dice, folding, seconds=1.0, pairs=2):
    return [{"method": name, "dice_mean": str(dice), "folding_pct": str(folding), "seconds": str(seconds)}] * pairs


def test_data_sets_weigh_equally_and_folding_must_hold_on_each():
    grid = chooser.settings_grid([0, 50], [0.1], [0.5, 2.0], ["ddf"])
    alone, soft, stiff = (chooser.method_name(s) for s in grid)
    rows = {"a": _rows(alone, 0.70, 0.0) + _rows(soft, 0.80, 0.01) + _rows(stiff, 0.76, 0.0),
            "b": _rows(alone, 0.60, 0.0, pairs=8) + _rows(soft, 0.70, 0.20, pairs=8) + _rows(stiff, 0.64, 0.0, pairs=8)}
    points = chooser.summarise(rows, grid, 0.05)
    assert [p["dice_mean"] for p in points] == pytest.approx([0.65, 0.75, 0.70])
    assert [p["admissible"] for p in points] == [True, False, True]  # b folds too much with the soft setting
    assert chooser.method_name(chooser.choose(points)) == stiff
    tie = chooser.summarise({"a": _rows(alone, 0.7, 0.0) + _rows(soft, 0.7, 0.0)}, grid[:2], 0.05)
    assert chooser.choose(tie)["steps"] == 0  # a tie goes to the faster
    with pytest.raises(ValueError, match="folding"):
        chooser.choose([dict(p, admissible=False) for p in points])
    assert chooser.summarise({"a": _rows(alone, 0.7, 0.0)}, grid, 0.05)[1:] == []  # unevaluated settings are left out


def test_settings_are_run_on_validation_pairs_and_the_choice_reproduces_them(tmp_path):
    ckpt = write_random_registration_checkpoint(tmp_path / "plain.pt")
    out = tmp_path / "choose"
    grid = chooser.settings_grid([0, 3], [0.5], [0.1], ["ddf"])
    result = chooser.run({"tiny": TinyValidation()}, out, ckpt, chooser.DEFAULT_CONFIGS.split(","), grid, 100.0,
                         {"prealign": "none"})
    with open(out / "tiny" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({r["method"] for r in rows}) == sorted(chooser.method_name(s) for s in grid)
    assert len(rows) == 2 * len(grid)  # a->b and b->a, each setting
    dice = {r["method"]: [] for r in rows}
    for r in rows:
        dice[r["method"]].append(float(r["dice_mean"]))
    assert dice[chooser.method_name(grid[0])] != dice[chooser.method_name(grid[1])], "the refinement must run"
    choice = json.loads((out / "choice.json").read_text())
    best = chooser.choose(result["curve"])
    assert choice["set"] == chooser.overrides(best) and choice["extra_overrides"] == {"prealign": "none"}
    with open(out / "curve.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(grid)
    # resumed: nothing is re-run
    chooser.run({"tiny": TinyValidation()}, out, ckpt, chooser.DEFAULT_CONFIGS.split(","), grid, 100.0, {"prealign": "none"})
    with open(out / "tiny" / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_native_settings_parse_name_and_override_the_native_refinement_ids():
    assert chooser.parse_levels("2:60+1:20") == [[2, 60], [1, 20]]
    for bad in ("2x60", "0:10", "2:-1", "2:60+1"):
        with pytest.raises(ValueError, match="factor:steps"):
            chooser.parse_levels(bad)
    grid = chooser.native_grid([[[2, 60], [1, 20]], [[1, 30]]], [0.25], [0.1, 1.0], ["svf"])
    assert len(grid) == 4 and {s["steps"] for s in grid} == {80, 30}
    assert len({chooser.method_name(s) for s in grid}) == 4
    assert chooser.method_name(grid[0]) == "native_2x60-1x20_lr0.25_s0.1_svf"
    assert chooser.overrides(grid[0]) == {"instance_optimisation_steps": 0, "native_refinement_levels": [[2, 60], [1, 20]],
                                          "native_refinement_lr": 0.25, "native_refinement_smoothness": 0.1,
                                          "native_refinement_residual": "svf"}


def test_native_settings_run_through_the_inference_config(tmp_path):
    ckpt = write_random_registration_checkpoint(tmp_path / "plain.pt")
    out = tmp_path / "choose"
    grid = chooser.settings_grid([0], [0.1], [1.0], ["ddf"]) + chooser.native_grid([[[1, 4]]], [0.5], [0.1], ["ddf"])
    result = chooser.run({"tiny": TinyValidation()}, out, ckpt, chooser.DEFAULT_CONFIGS.split(","), grid, 100.0,
                         {"prealign": "none"})
    with open(out / "tiny" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({r["method"] for r in rows}) == sorted(chooser.method_name(s) for s in grid)
    dice = {name: [float(r["dice_mean"]) for r in rows if r["method"] == name] for name in {r["method"] for r in rows}}
    assert dice[chooser.method_name(grid[0])] != dice[chooser.method_name(grid[1])], "the native refinement must run"
    assert json.loads((out / "choice.json").read_text())["set"] == chooser.overrides(chooser.choose(result["curve"]))
