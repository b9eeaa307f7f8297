"""benchmarks/pretrain.py helpers: the semi-supervised (labelled) training datalist."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import pretrain  # noqa: E402


def test_labelled_datalist_keeps_pairs_of_labelled_subjects(tmp_path):
    for name in ("A_image", "A_label", "B_image", "B_label", "C_image"):  # C has no label map
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    image = lambda s: str(tmp_path / f"{s}_image.nii.gz")  # noqa: E731
    pairs = [{"moving": image(m), "fixed": image(f), "name": f"{m}_to_{f}"} for m, f in ("AB", "BA", "AC", "CB")]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": pairs, "validation": [{"moving": image("A"), "fixed": image("B")}]}))
    out = json.loads(pretrain.labelled_datalist(datalist).read_text())
    assert [p["name"] for p in out["training"]] == ["A_to_B", "B_to_A"]
    assert out["training"][0]["moving_label"].endswith("A_label.nii.gz") and out["training"][0]["fixed_label"].endswith("B_label.nii.gz")
    assert out["validation"] == json.loads(datalist.read_text())["validation"]
    assert pretrain.run_dir(tmp_path, True, 1.0).name == "registration_labels"
    assert pretrain.run_dir(tmp_path, False, 0.0).name == "joint"


def test_labelled_datalist_without_any_labelled_pair_is_an_error(tmp_path):
    (tmp_path / "C_image.nii.gz").write_bytes(b"")
    datalist = tmp_path / "datalist.json"
    pair = {"moving": str(tmp_path / "C_image.nii.gz"), "fixed": str(tmp_path / "C_image.nii.gz")}
    datalist.write_text(json.dumps({"training": [pair], "validation": []}))
    with pytest.raises(ValueError, match="no training pair"):
        pretrain.labelled_datalist(datalist)
