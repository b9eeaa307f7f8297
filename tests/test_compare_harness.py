"""The side-by-side evaluation harness (benchmarks/compare_baselines.py): scoring, the datasets, greedy's and
ANTs' runners (a tiny synthetic pair; skipped without picsl-greedy / antspyx) and a real-data run."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, SHARED_DATA

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import compare_baselines  # noqa: E402
from bundle.data.evaluation import DATASETS, LPBA40, OASIS, _write, load  # noqa: E402


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


def test_lpba40_split_lists_test_subjects_and_labels():
    """The committed split alone (no data needed): 4 held-out subjects, 56 structures named by value."""
    dataset = LPBA40()
    assert DATASETS["lpba40"] is LPBA40
    assert dataset.testing == ["S01", "S23", "S24", "S25"]
    assert not set(dataset.testing) & set(dataset.split["training"] + dataset.split["validation"])
    assert len(dataset.labels) == 56 and 0 not in dataset.labels
    assert dataset.labels[21] == "L21" and dataset.labels[182] == "L182"
    assert "56 manually delineated structures" in dataset.describe()


@pytest.mark.skipif(not (SHARED_DATA / "lpba40").is_dir(), reason="../shared/data/lpba40 absent")
def test_lpba40_writes_a_subject(tmp_path):
    dataset = LPBA40()
    subject = dataset.subject("S23", tmp_path)
    assert subject["image"] == tmp_path / "S23_image.nii.gz" and subject["label"] == tmp_path / "S23_label.nii.gz"
    assert subject["image_array"].shape == subject["label_array"].shape == (160, 192, 160)
    assert subject["label_array"].dtype == np.int16
    assert set(np.unique(subject["label_array"]).tolist()) == {0, *dataset.labels}
    written, affine = load(subject["label"])
    np.testing.assert_array_equal(written, subject["label_array"])
    np.testing.assert_allclose(affine, subject["affine"], atol=1e-5)


# A grid stored like LPBA40 (flipped x and y) with anisotropic voxels: catches LPS/RAS or axis-order slips.
_AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, -1.0, 0, 10.0], [0, 0, 1.2, -5.0], [0, 0, 0, 1]])


def _blob(name: str, shift: float, work: Path) -> dict:
    """A 32^3 subject: two Gaussian blobs centred ``shift`` voxels along the first axis from the middle, labels
    1 and 2 the two halves (along that axis) of the larger blob's ellipsoid."""
    i = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"))
    c = np.array([15.5 + shift, 15.5, 15.5])
    r2 = sum(((i[k] - c[k]) / s) ** 2 for k, s in enumerate((7, 6, 5)))
    image = np.exp(-r2 / 2) + 0.5 * np.exp(-sum((i[k] - c[k] - d) ** 2 for k, d in enumerate((3, -2, 2))) / 8)
    label = (r2 < 1) * (1 + (i[0] > c[0]))
    return _write(name, image, label, _AFFINE, work)


def test_greedy_command_lines():
    """Greedy's documented brain MRI usage: affine, deformable from it, label reslicing; then the composed field."""
    w = Path("/w")
    commands = compare_baselines.greedy_commands(w / "f.nii.gz", w / "m.nii.gz", w / "ml.nii.gz", w, threads=3)
    assert list(commands) == ["affine", "deformable", "reslice", "compose"]
    common = "-d 3 -threads 3 -V 0"
    assert commands["affine"] == (f"{common} -seed 1 -a -dof 12 -m NCC 2x2x2 -n 100x50x10 -ia-image-centers "
                                  "-i /w/f.nii.gz /w/m.nii.gz -o /w/greedy_affine.mat")
    assert commands["deformable"] == (f"{common} -seed 1 -m NCC 2x2x2 -n 100x50x10 -s 2.0vox 0.5vox -wp 0 "
                                      "-i /w/f.nii.gz /w/m.nii.gz -it /w/greedy_affine.mat -o /w/greedy_warp.nii.gz")
    assert commands["reslice"] == (f"{common} -rf /w/f.nii.gz -ri LABEL 0.2vox -rm /w/ml.nii.gz /w/greedy_warped_label.nii.gz "
                                   "-r /w/greedy_warp.nii.gz /w/greedy_affine.mat")
    assert commands["compose"] == (f"{common} -wp 0 -rf /w/f.nii.gz -rc /w/greedy_composed.nii.gz "
                                   "-r /w/greedy_warp.nii.gz /w/greedy_affine.mat")
    with pytest.raises(ValueError, match="whitespace.*/a b/f.nii.gz"):
        compare_baselines.greedy_commands(Path("/a b/f.nii.gz"), w / "m.nii.gz", w / "ml.nii.gz", w, threads=1)
    with pytest.raises(ValueError, match="threads"):
        compare_baselines.greedy_commands(w / "f.nii.gz", w / "m.nii.gz", w / "ml.nii.gz", w, threads=0)


def test_run_passes_and_records_greedy_threads(tmp_path, monkeypatch):
    """``run`` hands ``greedy_threads`` to greedy and appends it to the hardware column (greedy itself faked)."""
    calls = []

    def fake_greedy(moving, fixed, work, threads=None):
        calls.append(threads)
        return fixed["label_array"], np.ones(fixed["label_array"].shape), 1.0

    class Tiny:
        testing, labels = ["moving", "fixed"], {1: "a", 2: "b"}

        def subject(self, name, work):
            return _blob(name, 3.0 if name == "moving" else 0.0, work)

    monkeypatch.setattr(compare_baselines, "run_greedy", fake_greedy)
    compare_baselines.run(Tiny(), tmp_path, ["greedy"], [0], compare_baselines.DEFAULT_CKPT, None, ["inference.json"],
                          greedy_threads=2)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert calls == [2, 2] and [r["pair"] for r in rows] == ["moving_to_fixed", "fixed_to_moving"]
    assert all(r["hardware"].endswith("; greedy -threads 2") and float(r["dice_mean"]) == 1.0 for r in rows)
    with pytest.raises(ValueError, match="unknown method.*'syn'"):
        compare_baselines.run(Tiny(), tmp_path, ["syn"], [0], compare_baselines.DEFAULT_CKPT, None, ["inference.json"])
    with pytest.raises(ValueError, match="threads"):
        compare_baselines.run(Tiny(), tmp_path, ["greedy"], [0], compare_baselines.DEFAULT_CKPT, None, ["inference.json"],
                              greedy_threads=0)


def test_ours_runs_the_bundle_inference_and_scores_against_the_fixed_subject(tmp_path):
    """Method ``ours``: the bundle's inference config in-process (shipped weights, 4 mm grid, no pre-alignment on
    the blob pair), one scored row per pair, resumable."""
    class Tiny:
        testing, labels = ["moving", "fixed"], {1: "a", 2: "b"}

        def subject(self, name, work):
            return _blob(name, 3.0 if name == "moving" else 0.0, work)

    args = (Tiny(), tmp_path, ["ours", "identity"], [0], compare_baselines.DEFAULT_CKPT, 1, ["inference.json"])
    compare_baselines.run(*args, overrides={"prealign": "none"})
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["pair"]) for r in rows] == [("ours", "moving_to_fixed"), ("identity", "moving_to_fixed")]
    ours, identity = (float(r["dice_mean"]) for r in rows)
    assert 0.0 < ours <= 1.0 and float(rows[0]["seconds"]) > 0 and float(rows[0]["folding_pct"]) < 1.0
    assert identity < 0.6  # the blob is shifted by 3 voxels: the score is against the fixed subject's labels
    compare_baselines.run(*args, overrides={"prealign": "none"})
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # resumed: nothing registered twice


def _registers_the_blob(runner, tmp_path) -> np.ndarray:
    """Run ``runner`` on the shifted blob pair: Dice well above identity, no folding. Returns the Jacobian."""
    moving, fixed = _blob("moving", 3.0, tmp_path), _blob("fixed", 0.0, tmp_path)
    labels = {1: "a", 2: "b"}
    before = compare_baselines.score(compare_baselines.run_identity(moving, fixed, tmp_path)[0], fixed, None, labels)
    warped, jacobian, seconds = runner(moving, fixed, tmp_path)
    after = compare_baselines.score(warped, fixed, jacobian, labels)
    assert warped.shape == jacobian.shape == fixed["label_array"].shape and seconds > 0
    assert before["dice_mean"] < 0.5 and after["dice_mean"] > before["dice_mean"] + 0.2
    assert after["folding_pct"] < 0.01
    return jacobian


def test_greedy_registers_a_shifted_blob(tmp_path):
    """End to end on a tiny pair, one thread; greedy's composed field read as our pull-back DDF in voxels."""
    pytest.importorskip("picsl_greedy")
    from bundle.io.itk_export import read_itk_displacement_field

    _registers_the_blob(lambda m, f, work: compare_baselines.run_greedy(m, f, work, threads=1), tmp_path)
    ddf, affine = read_itk_displacement_field(tmp_path / compare_baselines.GREEDY_FILES["composed"])
    inside = load(tmp_path / "fixed_label.nii.gz")[0] > 0
    assert np.median(ddf[0][inside]) == pytest.approx(3.0, abs=0.6)  # the moving blob lies 3 voxels further on
    assert abs(np.median(ddf[1][inside])) < 0.6 and abs(np.median(ddf[2][inside])) < 0.6
    np.testing.assert_allclose(affine, _AFFINE, atol=1e-4)


def test_ants_syn_full_passes_its_settings_to_antspyx(tmp_path, monkeypatch):
    """``ants_syn_full`` = ``run_ants`` + CC / 100x70x50x20; ``ants_syn`` passes nothing beyond antspyx's defaults.
    antspyx faked (a real SyN with these settings takes minutes even on a tiny pair): an identity transform."""
    import types

    from bundle.io.itk_export import write_itk_displacement_field

    moving, fixed = _blob("moving", 3.0, tmp_path), _blob("fixed", 0.0, tmp_path)
    calls = []

    def apply_transforms(f, image, transforms, interpolator="linear", compose=None):
        if compose is not None:  # the whole transform as one field on the fixed grid
            return str(write_itk_displacement_field(np.zeros((3, 32, 32, 32)), _AFFINE, compose + "comp.nii.gz"))
        return types.SimpleNamespace(numpy=lambda: image)

    def registration(fixed, moving, **kwargs):
        calls.append(kwargs)
        return {"fwdtransforms": ["warp.nii.gz", "affine.mat"]}

    fake = types.SimpleNamespace(image_read=lambda path: load(Path(path))[0], registration=registration,
                                 apply_transforms=apply_transforms)
    monkeypatch.setitem(sys.modules, "ants", fake)
    warped, jacobian, seconds = compare_baselines.RUNNERS["ants_syn_full"](moving, fixed, tmp_path)
    compare_baselines.RUNNERS["ants_syn"](moving, fixed, tmp_path)
    assert calls == [{"type_of_transform": "SyN", "random_seed": 0, "reg_iterations": (100, 70, 50, 20), "syn_metric": "CC",
                      "syn_sampling": 4}, {"type_of_transform": "SyN", "random_seed": 0}]
    np.testing.assert_array_equal(warped, moving["label_array"])
    np.testing.assert_allclose(jacobian, 1.0, atol=1e-5)
    assert warped.dtype == np.int16 and seconds >= 0


class _FakeDataset:
    """Subjects A..E; D has no label map (an unlabelled training subject)."""

    name = "fake"

    def __init__(self, validation):
        self.split = {"training": ["D", "A", "B", "C"], "validation": validation, "testing": ["E", "F"]}
        self.testing = self.split["testing"]
        self.written = []

    def subject(self, subject, work):
        if subject == "D":
            raise FileNotFoundError("no label for D")
        self.written.append(subject)
        return {"name": subject}


def _names(pairs):
    return [(m["name"], f["name"]) for m, f in pairs]


def test_split_pairs_testing_and_validation(tmp_path):
    data = _FakeDataset(["V", "W"])
    assert _names(compare_baselines.split_pairs(data, "testing", tmp_path)) == [("E", "F"), ("F", "E")]
    assert _names(compare_baselines.split_pairs(data, "validation", tmp_path)) == [("V", "W"), ("W", "V")]
    # one validation subject: paired both ways with the first two labelled training subjects, never a test subject
    single = _FakeDataset(["V"])
    pairs = _names(compare_baselines.split_pairs(single, "validation", tmp_path))
    assert pairs == [("V", "A"), ("A", "V"), ("V", "B"), ("B", "V")]
    assert not {"E", "F"} & set(single.written)
    with pytest.raises(ValueError, match="no validation"):
        compare_baselines.split_pairs(_FakeDataset([]), "validation", tmp_path)
    with pytest.raises(ValueError, match="section"):
        compare_baselines.split_pairs(data, "train", tmp_path)


def test_metadata_eval_metric_is_the_published_held_out_number():
    """``configs/metadata.json``'s ``eval_metrics`` is the shipped model's mean Dice over the IBSR test pairs
    in docs/results/baselines.csv (method ``ours``), not a placeholder."""
    import json

    meta = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    rows = [r for r in csv.DictReader(open(REPO_ROOT / "docs" / "results" / "baselines.csv")) if r["method"] == "ours"]
    assert rows, "no 'ours' rows in docs/results/baselines.csv"
    mean = float(np.mean([float(r["dice_mean"]) for r in rows]))
    assert meta["eval_metrics"] == {"ibsr_test_mean_dice_csf_gm_wm": round(mean, 3)}
