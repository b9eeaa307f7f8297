"""benchmarks/tumour_campaign.py: the cross-validation folds, their datalists and the held-out scoring."""

from __future__ import annotations

import sys
from itertools import chain
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import CONFIGS, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import tumour_campaign  # noqa: E402

from bundle.data import load_split  # noqa: E402
from bundle.io.writers import write_nifti  # noqa: E402


def _finished_fold(root: Path, info: dict, weights: bool = True) -> None:
    """A fold folder as a finished training leaves it: ``finished.json`` and (unless not ``weights``, a rejected
    recipe's fold on a fresh clone) ``models/model.pt``."""
    import json

    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "finished.json").write_text(json.dumps(info))
    if weights:
        (root / "models" / "model.pt").write_bytes(b"weights")


def _subjects(pairs, keys=("moving_tumour", "fixed_tumour")):
    return {p[k].split("/")[-2] for p in pairs for k in keys}


def test_every_subject_is_held_out_once_and_never_trained_on_in_its_fold(tmp_path):
    split = load_split("tumour")
    cv = {f: s for f, s in split["folds"].items() if s["testing"]}
    tested = list(chain.from_iterable(s["testing"] for s in cv.values()))
    assert sorted(tested) == sorted(split["subjects"])  # each subject tested exactly once
    for fold, spec in split["folds"].items():
        datalist = tumour_campaign.fold_datalist(split, fold, tmp_path)
        held_out = set(spec["testing"])
        assert not (_subjects(datalist["training"]) | _subjects(datalist["validation"])) & held_out
        assert spec["validation"] not in _subjects(datalist["training"])
        assert spec["validation"] in _subjects(datalist["validation"])
        # selection (the fixed image's tumour Dice) on the validation subject only, never on a training image
        assert {Path(p["fixed_tumour"]).parent.name for p in datalist["validation"]} == {spec["validation"]}
        assert _subjects(datalist["testing"]) == held_out
        trained = [s for s in split["subjects"] if s not in held_out and s != spec["validation"]]
        assert len(datalist["training"]) == len(trained) * (len(trained) - 1)
        assert all(len(p["moving"]) == 2 for p in datalist["training"])  # T1c and FLAIR


def test_a_fold_whose_validation_subject_is_tested_is_refused(tmp_path):
    split = load_split("tumour")
    split["folds"]["bad"] = {"testing": ["TCGA-DU-7294"], "validation": "TCGA-DU-7294"}
    with pytest.raises(ValueError, match="fold bad"):
        tumour_campaign.fold_datalist(split, "bad", tmp_path)


def test_held_out_rows_score_the_fixed_and_moving_segmentations(tmp_path):
    affine = np.eye(4)
    truth_a = np.zeros((8, 8, 8), np.uint8)
    truth_a[2:6, 2:6, 2:6] = 1  # 64 voxels
    truth_b = np.zeros((8, 8, 8), np.uint8)
    truth_b[0:2, 0:2, 0:2] = 1
    for subject, truth in (("brats_2013_pat0001_1", truth_a), ("TCGA-DU-7294", truth_b)):
        write_nifti(truth[None], affine, tmp_path / "data" / subject / "tumour.nii.gz")
    datalist = tumour_campaign.fold_datalist(
        {"subjects": ["brats_2013_pat0001_1", "TCGA-DU-7294", "x", "y"], "folds": {"f": {"testing": ["brats_2013_pat0001_1", "TCGA-DU-7294"], "validation": "x"}}},
        "f", tmp_path / "data") | {"training": [], "validation": []}
    half = truth_a.copy()
    half[2:4] = 0  # 32 of the 64 voxels: Dice 2*32/(32+64)
    out = tmp_path / "out"
    name = "TCGA-DU-7294_to_brats_2013_pat0001_1"
    write_nifti(half[None], affine, out / name / "seg_fixed.nii.gz")
    write_nifti(np.zeros_like(truth_b)[None], affine, out / name / "seg_moving.nii.gz")  # missed: Dice 0
    other = "brats_2013_pat0001_1_to_TCGA-DU-7294"
    write_nifti(truth_b[None], affine, out / other / "seg_fixed.nii.gz")
    write_nifti(truth_a[None], affine, out / other / "seg_moving.nii.gz")
    rows = {r["subject"]: r for r in tumour_campaign.held_out_rows("f", datalist, out)}
    assert rows["brats_2013_pat0001_1"]["tumour_dice"] == pytest.approx(2 * 32 / 96, abs=1e-4)
    assert rows["brats_2013_pat0001_1"]["labels"] == "expert"
    assert rows["brats_2013_pat0001_1"]["moving_subject"] == "TCGA-DU-7294"
    assert rows["brats_2013_pat0001_1"]["moving_subject_tumour_dice"] == 0.0
    assert rows["TCGA-DU-7294"]["tumour_dice"] == 1.0 and rows["TCGA-DU-7294"]["labels"] == "automatic (silver)"
    assert rows["TCGA-DU-7294"]["moving_subject_tumour_dice"] == 1.0


def test_training_selects_on_the_tumour_dice_of_validation_pairs():
    command = tumour_campaign.campaign.training_command(
        REPO_ROOT / "d.json", REPO_ROOT / "r", 1, tumour_campaign.TRAINING_OVERRIDES, tumour_campaign.CONFIGS)
    config = command[command.index("--config_file") + 1]
    assert "train.json" in config and "tumour_campaign.json" in config and "registration_only" not in config
    assert "@metrics#tumour_dice_fixed" in command[command.index("--validate#key_metric") + 1]


def test_a_missing_flair_is_given_as_a_zero_image_on_its_grid(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for case in ("a", "b"):
        (tmp_path / case).mkdir()
        write_nifti(np.full((1, 4, 4, 4), 0.5, np.float32), affine, tmp_path / case / "t1c.nii.gz")
        write_nifti(np.full((1, 4, 4, 4), 0.7, np.float32), affine * 2, tmp_path / case / "flair.nii.gz")
    pair = tumour_campaign._pair(tmp_path, "a", "b")
    stripped = tumour_campaign.without_flair({"testing": [pair]})["testing"][0]
    assert stripped["moving"][0] == pair["moving"][0] and stripped["fixed"][0] == pair["fixed"][0]  # T1c kept
    assert stripped["moving_tumour"] == pair["moving_tumour"]
    for image in ("moving", "fixed"):
        zero = nib.load(stripped[image][1])
        flair = nib.load(pair[image][1])
        assert zero.shape == flair.shape and np.allclose(zero.affine, flair.affine)
        assert not np.asarray(zero.dataobj).any()


def test_evaluate_segment_scores_each_held_out_subject_from_its_raw_files(tmp_path, monkeypatch):
    """``evaluate-segment``: one run of the shipped segmentation configs per finished fold on its test subjects'
    raw T1c + FLAIR files with the fold's best weights; Dice against the subject's own labels (any label > 0)."""
    import json
    import subprocess

    import tumour_ablation

    affine = np.eye(4)
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:6, 2:6, 2:6] = 2  # 64 voxels of label 2 (edema): the whole tumour is label > 0
    sources = {}
    for subject in ("brats_2013_pat0001_1", "TCGA-DU-7294"):
        files = {k: tmp_path / "raw" / subject / f"{k}.nii.gz" for k in ("t1c", "flair", "tumour")}
        write_nifti(truth[None], affine, files["tumour"])
        sources[subject] = files
    split = {"subjects": [*sources, "x", "y"],
             "folds": {"f": {"testing": list(sources), "validation": "x"}, "g": {"testing": ["x"], "validation": "y"},
                       "all": {"testing": [], "validation": "x"}}}
    for fold in ("f", "all"):  # g is not finished: skipped
        _finished_fold(tmp_path / "campaign" / f"tumour_{fold}", {"best_iteration": 300, "hardware": "cpu"})
    monkeypatch.setattr(tumour_campaign, "load_split", lambda name: split)
    monkeypatch.setattr(tumour_ablation, "_sources", lambda data: sources)
    monkeypatch.setattr(tumour_campaign, "CAMPAIGNS", tmp_path / "campaign")
    calls = []

    def fake_run(cmd, **kwargs):  # the bundle command: a half-found tumour, and one found whole
        settings = dict(zip(cmd, cmd[1:]))
        calls.append(settings)
        datalist = json.loads(Path(settings["--datalist"]).read_text())
        assert [e["image"] for e in datalist["testing"]] == [[str(sources[s]["t1c"]), str(sources[s]["flair"])] for s in sources]
        half = (truth > 0).astype(np.uint8)
        half[2:4] = 0
        write_nifti(half[None], affine, Path(settings["--output_dir"]) / "brats_2013_pat0001_1" / "seg.nii.gz")
        write_nifti((truth > 0).astype(np.uint8)[None], affine, Path(settings["--output_dir"]) / "TCGA-DU-7294" / "seg.nii.gz")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tumour_campaign.subprocess, "run", fake_run)
    target = tumour_campaign.evaluate_segment(tmp_path / "runs", tmp_path / "cv_segment.csv")
    assert len(calls) == 1 and calls[0]["--ckpt_path"] == str(tmp_path / "campaign" / "tumour_f" / "models" / "model.pt")
    assert "tumour.json" in calls[0]["--config_file"] and "inference_segmentation.json" in calls[0]["--config_file"]
    import csv

    rows = {r["subject"]: r for r in csv.DictReader(open(target))}
    assert float(rows["brats_2013_pat0001_1"]["tumour_dice"]) == pytest.approx(2 * 32 / 96, abs=1e-4)
    assert float(rows["TCGA-DU-7294"]["tumour_dice"]) == 1.0 and rows["TCGA-DU-7294"]["labels"] == "automatic (silver)"
    assert rows["brats_2013_pat0001_1"]["best_iteration"] == "300"


def test_the_v2_run_has_its_own_folds_configs_datalists_and_results():
    assert tumour_campaign.fold_root("fold0").name == "tumour_fold0"  # the shipped model's folds keep their place
    assert tumour_campaign.fold_root("fold0", "tumour_v2").name == "tumour_v2_fold0"
    assert tumour_campaign.RECIPES["tumour_v2"][-2:] == ["tumour_augmentation.json", "tumour_regions.json"]
    assert tumour_campaign.regions("tumour_v2") and not tumour_campaign.regions("tumour")
    assert tumour_campaign.DATALISTS["tumour_v2"] == "datalist_regions.json"
    assert all((CONFIGS / f).is_file() for configs in tumour_campaign.RECIPES.values() for f in configs)
    assert tumour_campaign.results_path(tumour_campaign.RESULTS, "tumour_v2").name == "tumour_v2_cv.csv"
    assert tumour_campaign.results_path(tumour_campaign.SEGMENT_RESULTS, "tumour") == tumour_campaign.SEGMENT_RESULTS
    assert tumour_campaign.outputs_dir(Path("r"), "fold0", "test_outputs", "tumour_v2") == Path("r/fold0/tumour_v2/test_outputs")
    with pytest.raises(ValueError, match="unknown run"):
        tumour_campaign.fold_root("fold0", "nope")


def test_brats_labels_become_oedema_and_core_regions():
    import tumour_ablation

    labels = np.array([0, 1, 2, 3, 4, 2.0])  # necrosis, oedema, non-enhancing, enhancing (float storage, as BraTS 2013)
    assert tumour_ablation.tumour_regions(labels).tolist() == [0, 2, 1, 2, 2, 1]
    with pytest.raises(ValueError, match=r"\[5\]"):
        tumour_ablation.tumour_regions(np.array([0, 5]))


def test_held_out_rows_score_the_whole_tumour_and_the_core(tmp_path):
    affine = np.eye(4)
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:6, 2:6, 2:6] = 1  # oedema
    truth[3:5, 3:5, 3:5] = 2  # core, 8 voxels
    seg = truth.copy()
    seg[seg == 2] = 1  # the whole tumour found, the core called oedema
    seg[2, 2, 2] = 2  # and one wrong core voxel
    for subject in ("a", "b"):
        write_nifti(truth[None], affine, tmp_path / "data" / subject / "regions.nii.gz")
    split = {"subjects": ["a", "b", "x", "y"], "folds": {"f": {"testing": ["a", "b"], "validation": "x"}}}
    datalist = tumour_campaign.fold_datalist(split, "f", tmp_path / "data", "regions.nii.gz")
    assert datalist["testing"][0]["fixed_tumour"].endswith("regions.nii.gz")
    for pair in datalist["testing"]:
        for key in ("seg_fixed", "seg_moving"):
            write_nifti(seg[None], affine, tmp_path / "out" / pair["name"] / f"{key}.nii.gz")
    rows = tumour_campaign.held_out_rows("f", datalist, tmp_path / "out", core=True)
    assert rows[0]["tumour_dice"] == 1.0 and rows[0]["core_dice"] == 0.0 and rows[0]["moving_subject_core_dice"] == 0.0
    assert "core_dice" not in tumour_campaign.held_out_rows("f", datalist, tmp_path / "out")[0]


def test_evaluate_progression_scores_fold_all_on_every_time_point(tmp_path, monkeypatch):
    """The model to ship on the TCIA time points (raw T1post + FLAIR): whole-tumour and core Dice against the expert
    masks, volumes in ml on each time point's own grid."""
    import csv
    import json
    import subprocess

    affine = np.diag([0.5, 0.5, 6.5, 1.0])
    truth = np.zeros((8, 8, 4), np.uint8)
    truth[2:6, 2:6, 1:3] = 1  # 32 voxels of 1.625 mm^3
    data = tmp_path / "data"
    for patient in ("P1", "P2"):
        for tp in ("tp0_2000-01-01", "tp1_2000-06-01"):
            folder = data / "tumor_progression" / patient / tp
            for name in ("T1post", "FLAIRreg"):
                write_nifti(np.ones((8, 8, 4), np.float32), affine, folder / f"{name}.nii.gz")
            write_nifti(truth, affine, folder / "MaskTumor.nii.gz")
    monkeypatch.setattr(tumour_campaign, "load_split", lambda name: {"progression": ["P1", "P2"]})
    monkeypatch.setattr(tumour_campaign, "DATA", data)
    monkeypatch.setattr(tumour_campaign, "CAMPAIGNS", tmp_path / "campaign")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        tumour_campaign.evaluate_progression(tmp_path / "runs", tmp_path / "p.csv", run="tumour_v2")
    _finished_fold(tmp_path / "campaign" / "tumour_v2_all", {"best_iteration": 900}, weights=False)
    with pytest.raises(FileNotFoundError, match="no weights of fold all of run tumour_v2"):  # a rejected recipe's
        tumour_campaign.evaluate_progression(tmp_path / "runs", tmp_path / "p.csv", run="tumour_v2")
    _finished_fold(tmp_path / "campaign" / "tumour_v2_all", {"best_iteration": 900})
    calls = []

    def fake_run(cmd, **kwargs):  # oedema around the whole mask, the core on its first slice only
        settings = dict(zip(cmd, cmd[1:]))
        calls.append(settings)
        seg = truth.copy()
        seg[:, :, 2][truth[:, :, 2] > 0] = 2
        for entry in json.loads(Path(settings["--datalist"]).read_text())["testing"]:
            write_nifti(seg, affine, Path(settings["--output_dir"]) / entry["name"] / "seg.nii.gz")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tumour_campaign.subprocess, "run", fake_run)
    target = tumour_campaign.evaluate_progression(tmp_path / "runs", tmp_path / "p.csv", run="tumour_v2")
    assert len(calls) == 1 and calls[0]["--ckpt_path"] == str(tmp_path / "campaign" / "tumour_v2_all" / "models" / "model.pt")
    assert "tumour_regions.json" in calls[0]["--config_file"] and "inference_segmentation.json" in calls[0]["--config_file"]
    rows = list(csv.DictReader(open(target)))
    assert [r["time_point"] for r in rows] == ["P1_tp0", "P1_tp1", "P2_tp0", "P2_tp1"]
    assert float(rows[0]["whole_tumour_dice"]) == 1.0 and float(rows[0]["core_dice"]) == pytest.approx(2 * 16 / 48, abs=1e-4)
    assert float(rows[0]["expert_ml"]) == pytest.approx(32 * 1.625 / 1000, abs=0.01)
    assert rows[0]["input"] == "raw head"

    # skull-stripped: each time point's brain mask reaches the configs as its brain_mask; a missing one is named
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("P1_tp0", "P1_tp1", "P2_tp0"):
        write_nifti(np.ones((8, 8, 4), np.uint8), affine, masks / f"{name}_brain_mask.nii.gz")
    with pytest.raises(FileNotFoundError, match="P2_tp1_brain_mask.nii.gz"):
        tumour_campaign.evaluate_progression(tmp_path / "runs", tmp_path / "s.csv", run="tumour_v2", brain_masks=masks)
    write_nifti(np.ones((8, 8, 4), np.uint8), affine, masks / "P2_tp1_brain_mask.nii.gz")
    target = tumour_campaign.evaluate_progression(tmp_path / "runs", tmp_path / "s.csv", run="tumour_v2", brain_masks=masks)
    entries = json.loads(Path(calls[-1]["--datalist"]).read_text())["testing"]
    assert [Path(e["brain_mask"]).name for e in entries] == [f"{n}_brain_mask.nii.gz" for n in ("P1_tp0", "P1_tp1", "P2_tp0", "P2_tp1")]
    assert "stripped" in calls[-1]["--output_dir"] and calls[-1]["--output_dir"] != calls[0]["--output_dir"]
    assert {r["input"] for r in csv.DictReader(open(target))} == {"brain masks (progression_brain_masks.py)"}
    assert tumour_campaign.results_path(tumour_campaign.STRIPPED_PROGRESSION_RESULTS, "tumour_v3").name == "tumour_v3_progression_stripped.csv"


def test_progression_brain_masks_come_back_on_each_image_grid(tmp_path):
    """The brain extraction runs on a 1 mm isotropic copy; its mask is brought back to the thick-slice grid."""
    import nibabel as nib

    import progression_brain_masks

    affine = np.diag([0.5, 0.5, 6.5, 1.0])
    data = np.zeros((40, 40, 6), np.float32)
    data[10:30, 10:30, 1:5] = 1.0
    seen = []

    def extract(iso):  # a 'brain extraction': the bright voxels of the 1 mm copy
        seen.append(iso.header.get_zooms()[:3])
        return nib.Nifti1Image((np.asarray(iso.dataobj) > 0.5).astype(np.uint8), iso.affine)

    folder = tmp_path / "tp"
    folder.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(folder / "T1post.nii.gz"))
    nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), affine), str(folder / "MaskTumor.nii.gz"))
    sources = {"P_tp0": {"t1c": folder / "T1post.nii.gz", "tumour": folder / "MaskTumor.nii.gz"}}
    (path,) = progression_brain_masks.write_masks(tmp_path / "masks", extract, sources)
    assert np.allclose(seen[0], 1.0)
    mask = nib.load(str(path))
    np.testing.assert_allclose(mask.affine, affine)
    got = np.asarray(mask.dataobj)
    assert got.shape == data.shape and got.dtype == np.uint8
    assert (got == (data > 0)).mean() > 0.97 and got[15:25, 15:25, 2:4].all() and not got[:5].any()
    assert not list((tmp_path / "masks").glob(".*"))  # no temporary left


def test_the_shipped_fold_all_is_read_from_the_shipped_file(tmp_path):
    """The shipped model is fold ``all`` of run tumour_v3 (kept once, in models/pretrained); the earlier shipped model,
    fold ``all`` of run tumour, lives in its fold's folder like every other fold."""
    from bundle.configs import TUMOUR_CONFIGS, read_config

    root = tmp_path / "tumour_v3_all"
    assert tumour_campaign.fold_weights(root, "tumour_v3", "all") == tumour_campaign.SHIPPED_TUMOUR
    assert tumour_campaign.SHIPPED_TUMOUR.is_file()
    assert read_config(tumour_campaign.REPO, TUMOUR_CONFIGS).get_parsed_content("ckpt_path") == str(tumour_campaign.SHIPPED_TUMOUR)
    with pytest.raises(FileNotFoundError, match="no weights of fold all of run tumour in this checkout"):
        tumour_campaign.fold_weights(root, "tumour", "all")
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes(b"")
    assert tumour_campaign.fold_weights(root, "tumour_v3", "all") == root / "models" / "model.pt"
    assert tumour_campaign.fold_weights(tumour_campaign.fold_root("all", "tumour"), "tumour", "all").is_file()


def test_train_runs_the_chosen_folds_in_order_with_the_runs_configs_and_datalists(tmp_path, monkeypatch):
    calls = []

    def fake_train(minutes, threads, extra, root, configs, datalist, out):
        calls.append((root.name, configs, datalist.name))
        return 0

    monkeypatch.setattr(tumour_campaign, "CAMPAIGNS", tmp_path / "campaign")
    monkeypatch.setattr(tumour_campaign.campaign, "train", fake_train)
    monkeypatch.setattr(tumour_campaign.campaign, "status", lambda root, key: {"best_iteration": 1})
    for fold in ("fold3", "fold0"):
        (tmp_path / "campaign" / f"tumour_v2_{fold}").mkdir(parents=True)
    assert tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_v2", folds=["fold3", "fold0"]) == 0
    assert [c[0] for c in calls] == ["tumour_v2_fold3", "tumour_v2_fold0"]
    assert all(c[1] == tumour_campaign.RECIPES["tumour_v2"] and c[2] == "datalist_regions.json" for c in calls)
    assert (tmp_path / "campaign" / "tumour_v2_fold3" / "finished.json").is_file()
    assert tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_v2", folds=["fold3"]) == 0
    assert len(calls) == 2  # a finished fold is not trained again
    with pytest.raises(ValueError, match="unknown fold"):
        tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_v2", folds=["fold9"])


def _synthseg_like_map(path: Path) -> None:
    """A 40^3 label map with FreeSurfer white matter (2, 41), cortex (3, 42) and ventricles (4)."""
    label = np.zeros((40, 40, 40), np.int16)
    label[4:36, 4:36, 4:36] = 3
    label[8:32, 8:20, 8:32] = 2
    label[8:32, 20:32, 8:32] = 41
    label[18:22, 18:22, 18:22] = 4
    write_nifti(label[None], np.diag([1.5, 1.5, 1.5, 1.0]), path)


def test_synthetic_tumour_subjects_are_written_once_with_both_sequences_and_regions(tmp_path, monkeypatch):
    maps = {}
    for subject in ("01", "02"):
        maps[subject] = str(tmp_path / "maps" / f"synthseg_{subject}_label.nii.gz")
        _synthseg_like_map(Path(maps[subject]))
    monkeypatch.setattr(tumour_campaign.campaign, "synthseg_subjects", lambda split, out: maps)
    names = tumour_campaign.prepare_synthetic(tmp_path / "synthetic", count=3)
    assert names == ["synthetic_00_synthseg_01", "synthetic_01_synthseg_02", "synthetic_02_synthseg_01"]
    for name in names:
        folder = tmp_path / "synthetic" / name
        t1c, flair = (np.asarray(nib.load(folder / f"{s}.nii.gz").dataobj) for s in ("t1c", "flair"))
        regions = np.asarray(nib.load(folder / "regions.nii.gz").dataobj)
        whole = np.asarray(nib.load(folder / "tumour.nii.gz").dataobj)
        assert t1c.shape == flair.shape == regions.shape == (40, 40, 40)
        assert np.allclose(nib.load(folder / "t1c.nii.gz").affine, np.diag([1.5, 1.5, 1.5, 1.0]))
        assert 0 <= t1c.min() and t1c.max() <= 1 and 0 <= flair.min() and flair.max() <= 1
        assert set(np.unique(regions)) <= {0, 1, 2} and (regions == 2).any()
        assert np.array_equal(whole, (regions > 0).astype(whole.dtype))
        assert not t1c[regions == 0].size or t1c[(regions == 0) & (t1c > 0)].size  # a brain around the tumour
    # different seeds: different tumours even on the same map
    first, third = (np.asarray(nib.load(tmp_path / "synthetic" / n / "regions.nii.gz").dataobj) for n in (names[0], names[2]))
    assert not np.array_equal(first, third)
    stamp = (tmp_path / "synthetic" / names[0] / "t1c.nii.gz").stat().st_mtime_ns
    tumour_campaign.prepare_synthetic(tmp_path / "synthetic", count=3)  # already there: not rewritten
    assert (tmp_path / "synthetic" / names[0] / "t1c.nii.gz").stat().st_mtime_ns == stamp


def test_synthetic_pairs_join_subjects_of_different_maps_and_only_v3_trains_on_them(tmp_path, monkeypatch):
    names = [f"synthetic_{i:02d}_synthseg_{m}" for i, m in enumerate(["01", "02", "03", "01", "02", "03"])]
    pairs = tumour_campaign.synthetic_pairs(names, tmp_path, count=10)
    assert len(pairs) == 10 and pairs == tumour_campaign.synthetic_pairs(names, tmp_path, count=10)  # seeded
    for pair in pairs:
        m, f = (Path(pair[k]).parent.name for k in ("moving_tumour", "fixed_tumour"))
        assert m.rsplit("_", 1)[1] != f.rsplit("_", 1)[1] and pair["moving_tumour"].endswith("regions.nii.gz")
    split = load_split("tumour")
    for subject in split["subjects"]:  # the real cases' copies exist: prepare does not rewrite them
        (tmp_path / "data" / subject).mkdir(parents=True)
        (tmp_path / "data" / subject / "regions.nii.gz").touch()
    monkeypatch.setattr(tumour_campaign, "prepare_synthetic", lambda out: names)
    tumour_campaign.prepare(tmp_path)
    import json

    for fold in split["folds"]:
        v2 = json.loads((tmp_path / fold / "datalist_regions.json").read_text())
        v3 = json.loads((tmp_path / fold / tumour_campaign.DATALISTS["tumour_v3"]).read_text())
        assert v3["validation"] == v2["validation"] and v3["testing"] == v2["testing"]  # selection, test: real only
        real = [p for p in v3["training"] if "synthetic_" not in p["name"]]
        assert real == v2["training"] and v3["training"][len(real):] == tumour_campaign.synthetic_pairs(names, tmp_path / "synthetic")
        assert len(v3["training"]) - len(real) == min(tumour_campaign.SYNTHETIC_PAIRS, 24)  # 24 cross-map pairs of 6
    assert tumour_campaign.RECIPES["tumour_v3"] == tumour_campaign.RECIPES["tumour_v2"]


def test_the_conditioned_run_starts_from_the_plain_folds_weights(tmp_path, monkeypatch):
    calls = []

    def fake_train(minutes, threads, extra, root, configs, datalist, out):
        calls.append((root.name, configs, datalist.name, extra))
        return 0

    monkeypatch.setattr(tumour_campaign, "CAMPAIGNS", tmp_path / "campaign")
    monkeypatch.setattr(tumour_campaign.campaign, "train", fake_train)
    keys = []
    monkeypatch.setattr(tumour_campaign.campaign, "status", lambda root, key: keys.append(key) or {"best_iteration": 1})
    with pytest.raises(FileNotFoundError, match="tumour_fold0.*no weights"):
        tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_conditioned", folds=["fold0"])
    (tmp_path / "campaign" / "tumour_fold0" / "models").mkdir(parents=True)
    (tmp_path / "campaign" / "tumour_fold0" / "models" / "model.pt").write_bytes(b"")
    (tmp_path / "campaign" / "tumour_conditioned_fold0").mkdir(parents=True)
    assert tumour_campaign.train(None, 1, ["--x", "1"], out=tmp_path, run="tumour_conditioned", folds=["fold0"]) == 0
    (name, configs, datalist, extra), = calls
    assert name == "tumour_conditioned_fold0" and datalist == "datalist.json"
    assert configs[-2:] == ["joint_conditioned.json", "joint_conditioned_finetune.json"]
    settings = dict(zip(extra, extra[1:]))
    assert settings["--init_ckpt"] == str(tmp_path / "campaign" / "tumour_fold0" / "models" / "model.pt")
    assert settings["--x"] == "1" and "--validate#key_metric" not in settings  # the overlay's key: the objective
    assert keys == ["val_objective"]
    assert tumour_campaign.inference_configs("tumour_conditioned", ["inference.json"])[-1] == "joint_conditioned.json"


def _registration_outputs(folder: Path, fixed: np.ndarray, warped: np.ndarray, jacobian: np.ndarray, seg: np.ndarray,
                          warped_label: np.ndarray) -> None:
    affine = np.eye(4)
    write_nifti(warped, affine, folder / "warped.nii.gz")
    write_nifti(jacobian[None], affine, folder / "jacobian_det.nii.gz")
    write_nifti(seg[None], affine, folder / "seg_fixed.nii.gz")
    write_nifti(warped_label[None], affine, folder / "warped_label.nii.gz")


def test_regularisation_rows_score_similarity_outside_the_tumours_folding_and_the_segmentation(tmp_path):
    rng = np.random.default_rng(0)
    shape = (10, 10, 10)
    fixed = np.zeros((2, *shape), np.float32)
    fixed[:, 1:9, 1:9, 1:9] = rng.random((2, 8, 8, 8)) + 0.1  # the brain: 512 non-zero voxels
    tumour = np.zeros(shape, np.uint8)
    tumour[3:5, 3:5, 3:5] = 1
    for c, name in enumerate(("t1c", "flair")):
        write_nifti(fixed[c][None], np.eye(4), tmp_path / "f" / f"{name}.nii.gz")
    write_nifti(tumour[None], np.eye(4), tmp_path / "f" / "tumour.nii.gz")
    pair = {"fixed": [str(tmp_path / "f" / "t1c.nii.gz"), str(tmp_path / "f" / "flair.nii.gz")],
            "fixed_tumour": str(tmp_path / "f" / "tumour.nii.gz")}
    warped = fixed.copy()
    warped[1] = -warped[1]  # FLAIR anti-correlated ...
    warped[:, 3:5, 3:5, 3:5] = 7.0  # ... and garbage inside the fixed tumour, which is not scored
    jacobian = np.ones(shape, np.float32)
    jacobian[1:3, 1:9, 1:9] = np.exp(0.5)
    jacobian[1, 1, 1:5] = -0.2  # 4 folded brain voxels of 512
    jacobian[0] = -1.0  # outside the brain: not counted
    _registration_outputs(tmp_path / "o", fixed, warped, jacobian, tumour, np.zeros(shape, np.uint8))
    row = tumour_campaign.regularisation_rows(pair, tmp_path / "o")
    assert row["ncc_t1c"] == pytest.approx(1.0) and row["ncc_flair"] == pytest.approx(-1.0) and row["ncc_mean"] == 0.0
    assert row["folding_pct"] == pytest.approx(100 * 4 / 512, abs=1e-4)
    log_j = np.log(np.clip(jacobian[1:9, 1:9, 1:9], 1e-9, None))
    assert row["sd_log_jacobian"] == pytest.approx(float(log_j.std()), abs=1e-4)
    assert row["tumour_dice"] == 1.0
    # the warped moving tumour is left out too
    label = np.zeros(shape, np.uint8)
    label[6:8, 6:8, 6:8] = 1
    warped[1, 6:8, 6:8, 6:8] = 9.0
    _registration_outputs(tmp_path / "o2", fixed, warped, jacobian, np.zeros(shape, np.uint8), label)
    row = tumour_campaign.regularisation_rows(pair, tmp_path / "o2")
    assert row["ncc_flair"] == pytest.approx(-1.0) and row["tumour_dice"] == 0.0


def test_evaluate_regularisation_runs_every_weight_and_the_plain_fold(tmp_path, monkeypatch):
    import csv
    import json
    import subprocess

    monkeypatch.setattr(tumour_campaign, "CAMPAIGNS", tmp_path / "campaign")
    monkeypatch.setattr(tumour_campaign, "load_split", lambda name: {"folds": {"fold0": {"testing": ["a", "b"]},
                                                                             "all": {"testing": []}}})
    with pytest.raises(ValueError, match="not conditioned"):
        tumour_campaign.evaluate_regularisation(tmp_path, tmp_path / "r.csv", run="tumour_v2")
    with pytest.raises(FileNotFoundError, match="no finished fold"):
        tumour_campaign.evaluate_regularisation(tmp_path, tmp_path / "r.csv")
    (tmp_path / "campaign" / "tumour_conditioned_fold0").mkdir(parents=True)
    (tmp_path / "campaign" / "tumour_conditioned_fold0" / "finished.json").write_text(json.dumps({"best_iteration": 300}))
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "datalist.json").write_text(json.dumps({"testing": [{"name": "a_to_b"}]}))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(dict(zip(cmd, cmd[1:])))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tumour_campaign.subprocess, "run", fake_run)
    monkeypatch.setattr(tumour_campaign, "regularisation_rows", lambda pair, folder: {
        "ncc_mean": 0.5, "folding_pct": 0.0, "sd_log_jacobian": 0.1, "tumour_dice": 0.8, "folder": folder.parent.name})
    target = tumour_campaign.evaluate_regularisation(tmp_path, tmp_path / "r.csv", weights=(0.1, 10.0))
    assert [c.get("--regularisation_weight") for c in calls] == [None, "0.1", "10.0"]
    assert calls[0]["--ckpt_path"] == str(tmp_path / "campaign" / "tumour_fold0" / "models" / "model.pt")
    assert "joint_conditioned.json" not in calls[0]["--config_file"]
    assert all("joint_conditioned.json" in c["--config_file"] for c in calls[1:])
    rows = list(csv.DictReader(open(target)))
    assert [(r["model"], r["regularisation_weight"], r["folder"]) for r in rows] == [
        ("tumour", "plain (trained at 1.0)", "plain"), ("tumour_conditioned", "0.1", "0.1"), ("tumour_conditioned", "10.0", "10.0")]


def test_depth_in_head_is_zero_outside_small_at_the_scalp_and_large_at_the_centre(tmp_path):
    grid = np.stack(np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij"))
    radius = np.sqrt(((grid - 19.5) ** 2).sum(0))
    head = np.where(radius < 16, 100.0, 0.0).astype(np.float32)
    head[radius < 13] = 50.0  # a darker brain inside a brighter scalp: still one head
    write_nifti(head[None], np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "t1.nii.gz")
    depth = tumour_campaign.depth_in_head(tmp_path / "t1.nii.gz")
    assert depth[0, 0, 0] == 0 and depth[19, 19, 4] <= 2 * 2.0  # outside; one voxel inside the surface
    assert depth[19, 19, 19] == pytest.approx(2 * 16, abs=2 * 1.5)  # the centre: the radius in mm


def _progression_patient(data: Path, patient: str, shift_mm: float, seed: int) -> None:
    """Two time points of a fake head (bright 'brain' box with a core blob), tp0 shifted by ``shift_mm`` along x,
    thick slices like the real ones; T1post, FLAIRreg and MaskTumor per time point."""
    rng = np.random.default_rng(seed)
    shape = (48, 48, 12)
    for tp, shift in (("tp0_2000-01-01", shift_mm), ("tp1_2000-06-01", 0.0)):
        affine = np.diag([1.0, 1.0, 4.0, 1.0])
        affine[0, 3] = shift
        brain = np.zeros(shape, bool)
        brain[10:38, 10:38, 2:10] = True
        t1 = np.where(brain, 1.0 + 0.2 * rng.random(shape), 0.1).astype(np.float32)
        core = np.zeros(shape, np.uint8)
        core[20:26, 20:26, 4:7] = 1
        t1[core > 0] = 2.0
        folder = data / "tumor_progression" / patient / tp
        folder.mkdir(parents=True)
        for name, array in (("T1post", t1), ("FLAIRreg", t1[::-1].copy()), ("MaskTumor", core)):
            nib.save(nib.Nifti1Image(array, affine), str(folder / f"{name}.nii.gz"))


def test_progression_subjects_are_aligned_partially_labelled_and_paired(tmp_path, monkeypatch):
    """prepare_progression: tp0 rigidly aligned onto tp1's 1 mm grid, regions 2 in the expert mask, 3 elsewhere in the
    brain mask, 0 outside; the v4 datalists add both directions of the training patients' pairs, never the held-out
    one's; evaluate-progression of a v4 fold scores only its held-out patient and keeps the other fold's rows."""
    import csv
    import json
    import subprocess

    data, masks = tmp_path / "data", tmp_path / "masks"
    masks.mkdir()
    for i, patient in enumerate(("P1", "P2")):
        _progression_patient(data, patient, shift_mm=3.0 * (i + 1), seed=i)
        for tp in ("tp0", "tp1"):
            folder = next((data / "tumor_progression" / patient).glob(f"{tp}_*"))
            image = nib.load(str(folder / "T1post.nii.gz"))
            brain = (np.asarray(image.dataobj) > 0.5).astype(np.uint8)
            nib.save(nib.Nifti1Image(brain, image.affine), str(masks / f"{patient}_{tp}_brain_mask.nii.gz"))
    monkeypatch.setattr(tumour_campaign, "load_split", lambda name: {"progression": ["P1", "P2"]})
    monkeypatch.setattr(tumour_campaign, "DATA", data)
    patients = tumour_campaign.prepare_progression(tmp_path / "prog", masks)
    assert patients == {"P1": ["P1_tp0", "P1_tp1"], "P2": ["P2_tp0", "P2_tp1"]}
    for patient in ("P1", "P2"):
        regions = [np.squeeze(np.asarray(nib.load(str(tmp_path / "prog" / f"{patient}_{tp}" / "regions.nii.gz")).dataobj)) for tp in ("tp0", "tp1")]
        assert set(np.unique(regions[1]).tolist()) == {0, 2, 3}
        cores = [r == 2 for r in regions]
        # the shifted tp0 lands on tp1: their cores (the same blob) overlap
        assert tumour_campaign.dice(cores[0], cores[1]) > 0.8, patient
        t1c = np.squeeze(np.asarray(nib.load(str(tmp_path / "prog" / f"{patient}_tp1" / "t1c.nii.gz")).dataobj))
        assert t1c[regions[1] == 0].max() == 0 and t1c.max() == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="P1_tp0_brain_mask"):
        tumour_campaign.prepare_progression(tmp_path / "prog2", tmp_path / "none")

    pairs = tumour_campaign.progression_training_pairs(patients, tmp_path / "prog", held_out="P1")
    assert len(pairs) == 2 * tumour_campaign.PROGRESSION_REPEAT
    assert {(Path(p["moving"][0]).parent.name, Path(p["fixed"][0]).parent.name) for p in pairs} == {("P2_tp0", "P2_tp1"), ("P2_tp1", "P2_tp0")}
    assert all("moving_label" not in p and p["fixed_tumour"].endswith("regions.nii.gz") for p in pairs)
    assert len({p["name"] for p in pairs}) == len(pairs)

    # evaluate-progression of fold prog_P1 of a run with its own folds: only P1's time points; fold all refused
    monkeypatch.setattr(tumour_campaign, "RUN_FOLDS", {"tumour_v4": ["prog_P1", "prog_P2", "all", "fold0"]})
    monkeypatch.setattr(tumour_campaign, "PROGRESSION_FOLDS", {"tumour_v4": ["prog_P1", "prog_P2"]})
    monkeypatch.setattr(tumour_campaign, "CAMPAIGNS", tmp_path / "campaign")
    for fold in ("prog_P1", "prog_P2", "all", "fold0"):
        _finished_fold(tmp_path / "campaign" / f"tumour_v4_{fold}", {"best_iteration": 600})

    def fake_run(cmd, **kwargs):
        settings = dict(zip(cmd, cmd[1:]))
        for entry in json.loads(Path(settings["--datalist"]).read_text())["testing"]:
            truth = nib.load(str(next((data / "tumor_progression" / entry["name"].split("_")[0]).glob(f"{entry['name'].split('_')[1]}_*")) / "MaskTumor.nii.gz"))
            out = Path(settings["--output_dir"]) / entry["name"]
            out.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.asarray(truth.dataobj) * 2, truth.affine), str(out / "seg.nii.gz"))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tumour_campaign.subprocess, "run", fake_run)
    target = tmp_path / "v4.csv"
    tumour_campaign.evaluate_progression(tmp_path / "runs", target, run="tumour_v4", fold="prog_P1")
    tumour_campaign.evaluate_progression(tmp_path / "runs", target, run="tumour_v4", fold="prog_P2")
    tumour_campaign.evaluate_progression(tmp_path / "runs", target, run="tumour_v4", fold="prog_P1")  # again: replaced
    rows = list(csv.DictReader(open(target)))
    assert [(r["fold"], r["time_point"]) for r in rows] == [("prog_P1", "P1_tp0"), ("prog_P1", "P1_tp1"), ("prog_P2", "P2_tp0"), ("prog_P2", "P2_tp1")]
    assert all(float(r["core_dice"]) == 1.0 for r in rows)
    for fold in ("all", "fold0"):
        with pytest.raises(ValueError, match="trained on every progression patient"):
            tumour_campaign.evaluate_progression(tmp_path / "runs", target, run="tumour_v4", fold=fold)


def test_v4_folds_start_from_v3_fold_all(tmp_path, monkeypatch):
    calls = []

    def fake_train(minutes, threads, extra, root, configs, datalist, out):
        calls.append((root.name, extra, configs, datalist.name))
        return 0

    monkeypatch.setattr(tumour_campaign, "CAMPAIGNS", tmp_path / "campaign")
    monkeypatch.setattr(tumour_campaign.campaign, "train", fake_train)
    monkeypatch.setattr(tumour_campaign.campaign, "status", lambda root, key: {"best_iteration": 1})
    assert tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_v4", folds=["prog_PGBM-003"]) == 0
    (name, extra, configs, datalist), = calls
    assert name == "tumour_v4_prog_PGBM-003" and datalist == "datalist_progression_training.json"
    assert extra[extra.index("--init_ckpt") + 1] == str(tumour_campaign.SHIPPED_TUMOUR)  # v3's fold all, shipped
    assert configs[-1] == "tumour_partial.json" and "tumour_regions.json" in configs
    # the cross-validation folds start from v3's fold of the same name, which must have weights
    with pytest.raises(FileNotFoundError, match="tumour_v3_fold2"):
        tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_v4", folds=["fold2"])
    (tmp_path / "campaign" / "tumour_v3_fold2" / "models").mkdir(parents=True)
    (tmp_path / "campaign" / "tumour_v3_fold2" / "models" / "model.pt").write_bytes(b"weights")
    assert tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_v4", folds=["fold2"]) == 0
    name, extra, _, datalist = calls[-1]
    assert name == "tumour_v4_fold2" and datalist == "datalist_progression_training.json"
    assert extra[extra.index("--init_ckpt") + 1] == str(tmp_path / "campaign" / "tumour_v3_fold2" / "models" / "model.pt")
    with pytest.raises(ValueError, match="unknown fold"):
        tumour_campaign.train(None, 1, [], out=tmp_path, run="tumour_v4", folds=["fold9"])


def test_v4_datalists_add_the_progression_pairs_to_v3s_fold(tmp_path, monkeypatch):
    """prepare-v4: each fold's datalist is v3's datalist of its source fold plus the progression pairs of every
    patient but a prog_ fold's held-out one."""
    import json

    for fold in ("all", "fold0", "fold1", "fold2", "fold3"):
        (tmp_path / fold).mkdir()
        (tmp_path / fold / "datalist_regions_synthetic.json").write_text(json.dumps(
            {"training": [{"name": f"{fold}_pair"}], "validation": [{"name": f"{fold}_val"}], "testing": [{"name": f"{fold}_test"}]}))
    patients = {"PGBM-001": ["PGBM-001_tp0", "PGBM-001_tp1"], "PGBM-003": ["PGBM-003_tp0", "PGBM-003_tp1"]}
    monkeypatch.setattr(tumour_campaign, "prepare_progression", lambda out, masks: patients)
    monkeypatch.setattr(tumour_campaign, "progression_training_pairs",
                        lambda patients, data, held_out: [{"name": p} for p in sorted(patients) if p != held_out])
    paths = tumour_campaign.prepare_v4(tmp_path, tmp_path / "masks")
    lists = {p.parent.name: json.loads(p.read_text()) for p in paths}
    assert set(lists) == set(tumour_campaign.run_folds("tumour_v4"))
    assert [p["name"] for p in lists["prog_PGBM-001"]["training"]] == ["all_pair", "PGBM-003"]
    assert [p["name"] for p in lists["all"]["training"]] == ["all_pair", "PGBM-001", "PGBM-003"]
    assert [p["name"] for p in lists["fold2"]["training"]] == ["fold2_pair", "PGBM-001", "PGBM-003"]
    assert lists["fold2"]["testing"] == [{"name": "fold2_test"}] and lists["fold2"]["validation"] == [{"name": "fold2_val"}]
    with pytest.raises(ValueError, match="brain-masks"):
        tumour_campaign.prepare_v4(tmp_path, None)
