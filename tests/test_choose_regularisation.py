"""benchmarks/choose_regularisation.py: λ of a conditioned model chosen on validation pairs (highest Dice within a
folding limit, bracketing refinement), through the bundle's own inference config."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import choose_regularisation as chooser  # noqa: E402
from bundle.data.evaluation import _write  # noqa: E402

_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def test_the_admissible_weight_with_the_best_dice_is_chosen():
    points = [{"weight": 0.01, "dice_mean": 0.80, "folding_pct": 0.30, "pairs": 2},
              {"weight": 0.1, "dice_mean": 0.78, "folding_pct": 0.04, "pairs": 2},
              {"weight": 1.0, "dice_mean": 0.78, "folding_pct": 0.00, "pairs": 2},
              {"weight": 10.0, "dice_mean": 0.70, "folding_pct": 0.00, "pairs": 2}]
    assert chooser.choose(points, 0.05)["weight"] == 1.0  # 0.01 folds too much; the tie goes to the smoother
    assert chooser.choose(points, 1.0)["weight"] == 0.01
    with pytest.raises(ValueError, match=r"least: 0\.1000 % at λ = 1\)"):
        chooser.choose([dict(p, folding_pct=p["folding_pct"] + 0.1) for p in points][1:3], 0.05)
    assert chooser.refinement_weights(points, 1.0) == pytest.approx([np.sqrt(0.1), np.sqrt(10.0)])
    assert chooser.refinement_weights(points, 0.01) == pytest.approx([np.sqrt(0.001)])


class TinyValidation:
    """Two blob subjects, both in the validation split."""

    name, labels = "tiny", {1: "blob"}
    split = {"validation": ["a", "b"], "training": []}
    testing = ["a", "b"]

    def subject(self, name, work):
        i = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"))
        shift = 3.0 if name == "a" else 0.0
        r2 = sum(((i[k] - c) / s) ** 2 for k, (c, s) in enumerate(((15.5 + shift, 7), (15.5, 6), (15.5, 5))))
        return _write(name, np.exp(-r2 / 2), (r2 < 1).astype(np.int16), _AFFINE, work)


def _random_conditioned_checkpoint(path):
    """A conditioned network whose field and FiLM are far from zero, so that λ changes its output."""
    from bundle.networks import ConditionedRegistrationUNet

    torch.manual_seed(0)
    net = ConditionedRegistrationUNet(3, 2)
    torch.nn.init.normal_(net.head.conv.weight, std=0.3)
    for film in (*net.film_encoder, *net.film_decoder):
        torch.nn.init.normal_(film.linear.weight, std=1.0)
    torch.save({"network": net.state_dict()}, path)
    return path


def test_a_conditioned_checkpoint_is_scored_per_weight_and_the_choice_written(tmp_path):
    ckpt = _random_conditioned_checkpoint(tmp_path / "conditioned.pt")
    out = tmp_path / "choose"
    result = chooser.run(TinyValidation(), out, ckpt, chooser.DEFAULT_CONFIGS.split(","), [0.1, 10.0],
                         max_folding=100.0, refine=1, overrides={"prealign": "none"})
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    weights = sorted({float(r["method"].removeprefix("lambda_")) for r in rows})
    assert weights == pytest.approx([0.1, 1.0, 10.0])  # the grid and one geometric midpoint
    assert all(sum(float(r["method"].removeprefix("lambda_")) == pytest.approx(w) for r in rows) == 2 for w in weights)
    dice = {w: [float(r["dice_mean"]) for r in rows if float(r["method"].removeprefix("lambda_")) == pytest.approx(w)]
            for w in weights}
    assert dice[0.1] != dice[10.0], "the weight must reach the network"
    choice = json.loads((out / "choice.json").read_text())
    assert choice["regularisation_weight"] == chooser.choose(result["curve"], 100.0)["weight"]
    with open(out / "curve.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_the_hypergradient_variant_steps_lambda_on_the_validation_pairs_and_writes_its_choice(tmp_path):
    """The training config's validation pairs (network grid), a random conditioned network: λ moves, each step is a
    row of hypergradient.csv, and the choice is the admissible row of highest Dice."""
    ckpt = _random_conditioned_checkpoint(tmp_path / "conditioned.pt")
    work = tmp_path / "data"
    work.mkdir()
    a, b = (TinyValidation().subject(n, work) for n in ("a", "b"))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": [
        {"moving": str(m["image"]), "fixed": str(f["image"]), "moving_label": str(m["label"]), "fixed_label": str(f["label"])}
        for m, f in ((a, b), (b, a))]}))
    configs = ["train.json", "registration_only.json", "regularisation_conditioned.json"]
    result = chooser.run_hypergradient(ckpt, datalist, tmp_path / "out", start=1.0, steps=3, lr=0.5, max_folding=100.0,
                                       penalty=1.0, configs=configs, overrides={"num_classes": 2, "implant_lesions": False})
    with open(tmp_path / "out" / "hypergradient.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and float(rows[0]["weight"]) == pytest.approx(1.0)
    assert len({round(float(r["weight"]), 6) for r in rows}) > 1, "λ must move"
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)
    choice = json.loads((tmp_path / "out" / "hypergradient_choice.json").read_text())
    best = max(result["history"], key=lambda h: (round(h["dice"], 6), h["weight"]))
    assert choice["regularisation_weight"] == pytest.approx(best["weight"]) and choice["pairs"] == 2


def _results(folder, rows):
    """A per-data-set run's ``results.csv``: (λ, pair, Dice, folding) rows in compare_baselines' format."""
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "pair", "dice_mean", "folding_pct"])
        writer.writeheader()
        writer.writerows({"method": chooser.method_name(w), "pair": p, "dice_mean": d, "folding_pct": f}
                         for w, p, d, f in rows)
    return folder


def test_combine_scores_each_dataset_once_at_the_shared_weights(tmp_path):
    """Data set A (4 pairs) prefers λ 0.1, B (1 pair) prefers 1: each counts once; λ 3 (only in A) is not a candidate."""
    a = _results(tmp_path / "a", [(w, f"p{i}", d, 0.0) for w, d in ((0.1, 0.80), (1.0, 0.76), (3.0, 0.90)) for i in range(4)])
    b = _results(tmp_path / "b", [(0.1, "q", 0.60, 0.0), (1.0, "q", 0.66, 0.0)])
    result = chooser.combine([a, b], tmp_path / "combined", 0.05)
    assert [p["weight"] for p in result["curve"]] == [0.1, 1.0]
    assert result["curve"][0]["dice_mean"] == pytest.approx(0.70) and result["curve"][1]["dice_mean"] == pytest.approx(0.71)
    assert result["choice"]["regularisation_weight"] == 1.0 and result["choice"]["dice_a"] == pytest.approx(0.76)
    assert json.loads((tmp_path / "combined" / "choice.json").read_text())["regularisation_weight"] == 1.0
    with open(tmp_path / "combined" / "curve.csv") as fh:
        assert [r["dice_b"] for r in csv.DictReader(fh)] == ["0.6", "0.66"]
    with pytest.raises(ValueError, match="two or more"):
        chooser.combine([a], tmp_path / "x", 0.05)
    c = _results(tmp_path / "c", [(0.5, "r", 0.7, 0.0)])
    with pytest.raises(ValueError, match="no weight was evaluated by all"):
        chooser.combine([a, c], tmp_path / "x", 0.05)
    with pytest.raises(ValueError, match="no such file"):
        chooser.combine([a, tmp_path / "missing"], tmp_path / "x", 0.05)
