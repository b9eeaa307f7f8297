"""The joint registration + tumour segmentation model through the bundle commands on real tumour MRI.

BraTS 2013 (expert tumour labels, T1c + FLAIR stacked as 2 channels, 240 x 240 x 155, 1 mm, SRI24) from
``../shared/data`` (skipped when absent): training with the tumour-masked loss on one pair, evaluation,
pair inference (segmentations and warped tumour on the fixed native grid) and single-image segmentation.
Data: BraTS 2013 (Menze et al. 2015), CC BY-NC-SA 3.0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA, assert_summary_is_mean_of_pairs, config, load_nifti, metric_lines, run

CASES = [SHARED_DATA / "brats2013" / "train" / f"brats_2013_pat000{k}_1" for k in (5, 6)]
pytestmark = pytest.mark.skipif(
    not all((c / "OTMultiClass.nii.gz").is_file() for c in CASES), reason="BraTS 2013 cases not available"
)
COMMON = ["--num_channels", "2", "--pixdim", "[6.0,6.0,6.0]", "--num_workers", "0"]


def _pair(moving, fixed):
    return {
        "moving": [str(moving / "T1c_subtrMeanDivStd.nii.gz"), str(moving / "Flair_subtrMeanDivStd.nii.gz")],
        "fixed": [str(fixed / "T1c_subtrMeanDivStd.nii.gz"), str(fixed / "Flair_subtrMeanDivStd.nii.gz")],
        "moving_tumour": str(moving / "OTMultiClass.nii.gz"),
        "fixed_tumour": str(fixed / "OTMultiClass.nii.gz"),
        "moving_label": str(moving / "OTMultiClass.nii.gz"),
        "name": f"{moving.name}_to_{fixed.name}",
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tumour")
    pairs = [_pair(CASES[0], CASES[1]), _pair(CASES[1], CASES[0])]
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": pairs, "validation": pairs[:1], "testing": pairs[:1]}))
    # the anatomical "labels" here are the BraTS tumour classes 0-4 (5 classes), used for Dice only
    args = ["--bundle_root", root, "--datalist", datalist, "--num_classes", "5", *COMMON]
    result = run(
        ["run", "training", "--config_file", config("train.json"), *args, "--max_epochs", "2", "--val_interval", "1",
         "--mask_source", "label", "--implant_lesions", "False", "--progress_bar", "False"],
        timeout=600,
    )
    return root, datalist, args, result


def test_training_with_masked_loss(trained):
    root, _, _, result = trained
    result.check()
    assert (root / "models" / "model.pt").is_file()
    assert "val_tumour_dice_fixed" in result.output and "val_tumour_dice_moving" in result.output


def test_evaluation_reports_tumour_dice(trained):
    root, _, args, _ = trained
    run(["run", "evaluating", "--config_file", config("train.json", "evaluate.json"), *args], timeout=300).check()
    metrics = metric_lines(root / "eval" / "metrics.csv")
    for key in ("val_tumour_dice_fixed", "val_tumour_dice_moving", "val_folding_pct", "sd_log_jacobian"):
        assert key in metrics and np.isfinite(metrics[key]), metrics
    rows = assert_summary_is_mean_of_pairs(root / "eval", "val_tumour_dice_fixed")  # the pair's own value, summarised
    assert list(rows) == [json.loads((root / "datalist.json").read_text())["testing"][0]["name"]]


def test_pair_inference_writes_segmentations_on_fixed_grid(trained):
    root, datalist, args, _ = trained
    out = root / "pairs"
    run(["run", "inference", "--config_file", config("inference.json", "joint.json"), *args, "--output_dir", out,
         "--ckpt_path", root / "models" / "model.pt"], timeout=300).check()
    fixed, affine = load_nifti(CASES[1] / "T1c_subtrMeanDivStd.nii.gz")
    folder = out / json.loads(datalist.read_text())["testing"][0]["name"]
    for name in ("ddf.nii.gz", "jacobian_det.nii.gz", "warped_label.nii.gz"):
        data, data_affine = load_nifti(folder / name)
        assert data.shape[:3] == fixed.shape and np.allclose(data_affine, affine), name
    for name in ("seg_moving.nii.gz", "seg_fixed.nii.gz"):
        seg, seg_affine = load_nifti(folder / name)
        assert seg.shape == fixed.shape and np.allclose(seg_affine, affine)
        assert set(np.unique(seg)) <= {0, 1}
    warped, _ = load_nifti(folder / "warped.nii.gz")
    assert warped.shape == (*fixed.shape, 2), "both sequences are warped"
    warped_tumour, _ = load_nifti(folder / "warped_label.nii.gz")
    assert set(np.unique(warped_tumour)) <= {0, 1, 2, 3, 4} and (warped_tumour > 0).sum() > 0


def test_single_image_segmentation(trained):
    root, _, args, _ = trained
    out = root / "seg"
    run(["run", "inference", "--config_file", config("inference.json", "joint.json", "inference_segmentation.json"), *args, "--output_dir", out,
         "--ckpt_path", root / "models" / "model.pt"], timeout=300).check()
    fixed, affine = load_nifti(CASES[1] / "T1c_subtrMeanDivStd.nii.gz")
    seg, seg_affine = load_nifti(out / "T1c_subtrMeanDivStd" / "seg.nii.gz")
    assert seg.shape == fixed.shape and np.allclose(seg_affine, affine)
    assert set(np.unique(seg)) <= {0, 1}


def test_shipped_tumour_model_segments_a_subject_it_was_not_trained_on(tmp_path):
    """``brainreg segment`` with its default model (``configs/tumour.json``) on the raw BraTS 2013 files of the
    fold-``all`` validation subject (never trained on, but the weights were selected on it: a check that the shipped
    path works end to end, not an accuracy figure): T1c + FLAIR in, the tumour where the experts drew it, oedema and
    core apart."""
    from bundle.data import load_split

    subject = load_split("tumour")["folds"]["all"]["validation"]
    case = SHARED_DATA / "brats2013" / "validation" / subject
    image = [str(case / "T1c_subtrMeanDivStd.nii.gz"), str(case / "Flair_subtrMeanDivStd.nii.gz")]
    run(["segment", str(image), "--out", tmp_path / "seg"], module="bundle", timeout=300).check()
    seg, affine = load_nifti(tmp_path / "seg" / "seg.nii.gz")
    truth, truth_affine = load_nifti(case / "OTMultiClass.nii.gz")
    assert seg.shape == truth.shape and np.allclose(affine, truth_affine)
    assert set(np.unique(seg)) == {0, 1, 2}  # background, oedema, tumour core
    core, truth_core = seg == 2, np.isin(truth, (1, 3, 4))  # BraTS necrosis, non-enhancing, enhancing
    assert 2 * (core & truth_core).sum() / (core.sum() + truth_core.sum()) > 0.3
    seg, truth = seg > 0, truth > 0
    assert 2 * (seg & truth).sum() / (seg.sum() + truth.sum()) > 0.7


def test_shipped_tumour_model_names_a_missing_sequence(tmp_path):
    case = CASES[0]
    result = run(["segment", case / "T1c_subtrMeanDivStd.nii.gz", "--out", tmp_path / "seg"], module="bundle", timeout=300)
    result.check_fails("has 1 channel(s), expected 2 (T1c, FLAIR")
    assert not (tmp_path / "seg" / "seg.nii.gz").exists()
