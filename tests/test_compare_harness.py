"""The side-by-side evaluation harness (benchmarks/compare_baselines.py): scoring, the datasets, greedy's and
ANTs' runners (a tiny synthetic pair; skipped without picsl-greedy / antspyx) and a real-data run."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, SHARED_DATA, dice

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


def test_score_when_labels_are_lost():
    """A warped map that lost label 2: Dice 0 for it, HD95 over label 1 only (present in both maps); one that lost
    every label (a failed registration) scores Dice 0 and HD95 NaN instead of stopping the whole run."""
    label = np.zeros((20, 20, 20), np.int16)
    label[4:12, 4:12, 4:12], label[12:16, 4:12, 4:12] = 1, 2
    labels = {1: "a", 2: "b"}
    partial = np.where(label == 2, 0, label)
    row = compare_baselines.score(partial, _subject(label), None, labels)
    assert row["dice_a"] == 1.0 and row["dice_b"] == 0.0 and row["dice_mean"] == 0.5 and row["hd95_mm"] == 0.0
    row = compare_baselines.score(np.zeros_like(label), _subject(label), None, labels)
    assert row["dice_a"] == row["dice_b"] == row["dice_mean"] == 0.0 and np.isnan(row["hd95_mm"])


@pytest.mark.skipif(not (SHARED_DATA / "oasis" / "lapirn").is_dir(), reason="../shared/data/oasis absent")
def test_identity_and_report_on_oasis(tmp_path, monkeypatch):
    """Identity on both OASIS pairs writes one CSV row per pair with the dataset's label columns."""
    compare_baselines.run(OASIS(), tmp_path, ["identity"], [0], compare_baselines.DEFAULT_CKPT, None, ["inference.json"])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["pair"] for r in rows] == ["A_to_B", "B_to_A"]
    assert {"dice_label1", "dice_label2", "hd95_mm", "seconds"} <= set(rows[0])
    # both OASIS volumes share one template-space grid: identity = the Dice of the two label maps as they are
    a, b = (OASIS().subject(s, tmp_path / "inputs")["label_array"] for s in ("A", "B"))
    expected = dice(a, b, [1, 2])
    assert 0.3 < expected < 0.95
    assert [float(r["dice_mean"]) for r in rows] == [pytest.approx(expected, abs=1e-4)] * 2  # Dice is symmetric
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
    # one named pair only (a slow method's pairs run as processes side by side), and a pair that is not there
    calls.clear()
    compare_baselines.run(Tiny(), tmp_path / "one", ["greedy"], [0], compare_baselines.DEFAULT_CKPT, None,
                          ["inference.json"], greedy_threads=1, pair_names=["fixed_to_moving"])
    with open(tmp_path / "one" / "results.csv") as f:
        assert [r["pair"] for r in csv.DictReader(f)] == ["fixed_to_moving"] and calls == [1]
    with pytest.raises(ValueError, match="--pair moving_to_other: not a testing pair here; the pairs are moving_to_fixed, fixed_to_moving"):
        compare_baselines.run(Tiny(), tmp_path / "two", ["greedy"], [0], compare_baselines.DEFAULT_CKPT, None,
                              ["inference.json"], greedy_threads=1, pair_names=["moving_to_other"])
    assert not (tmp_path / "two").exists()  # failed before writing anything


def test_ours_runs_the_bundle_inference_and_scores_against_the_fixed_subject(tmp_path):
    """Method ``ours``: the bundle's inference config in-process (shipped registration weights, 2 mm grid, no pre-alignment on
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
    assert float(rows[0]["seconds"]) > 0 and float(rows[0]["folding_pct"]) < 1.0
    # the scores are against the fixed subject's labels: identity = their Dice with the moving ones (one grid), and
    # the row of ours = the score of the warped labels and det J the bundle wrote (kept for the figure)
    moving, fixed = _blob("moving", 3.0, tmp_path / "again"), _blob("fixed", 0.0, tmp_path / "again")
    identity = dice(moving["label_array"], fixed["label_array"], [1, 2])
    assert float(rows[1]["dice_mean"]) == pytest.approx(identity, abs=1e-4)
    kept = np.load(tmp_path / "figure" / "moving_to_fixed" / "ours.npz")
    assert kept["label"].shape == kept["jacobian"].shape == (32, 32, 32)
    expected = compare_baselines.score(kept["label"], fixed, kept["jacobian"], Tiny.labels)
    for key in ("dice_mean", "dice_a", "dice_b", "hd95_mm", "folding_pct", "sd_log_jacobian"):
        assert float(rows[0][key]) == pytest.approx(expected[key], abs=1e-4), key
    assert not np.array_equal(kept["label"], moving["label_array"])  # the network moved the labels
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


def test_hardware_column_names_the_threads_of_the_classical_tools(monkeypatch):
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    assert compare_baselines._threads("ants_syn_full", 2) == "; ITK threads 1"
    assert compare_baselines._threads("greedy", 2) == "; greedy -threads 2"
    assert compare_baselines._threads("affine", 2) == ""
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    assert compare_baselines._threads("ants_syn", 2) == "; ITK threads all cores"


def _phantom(name: str, shift: float, work: Path) -> dict:
    """The labels of :func:`_blob` in a textured 32^3 image (head, two-intensity inner ellipsoid, a small off-centre
    blob, a smooth texture over the whole grid), all shifted ``shift`` voxels along the first axis. The plain blob
    has too little texture for the Mattes MI affine stages of ANTs and elastix: both shrink it by about 20 %."""
    i = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"))
    x = i - np.array([15.5 + shift, 15.5, 15.5])[:, None, None, None]

    def r2(radii, offset=(0, 0, 0)):
        return sum(((x[k] - offset[k]) / s) ** 2 for k, s in enumerate(radii))

    def soft(r2_, width=0.15):
        return 1 / (1 + np.exp((np.sqrt(r2_) - 1) / width))

    inner = r2((7, 6, 5))
    texture = 0.1 * (1 + np.sin(x[0] / 2.5 + 1) * np.cos(x[1] / 3.1) * np.sin(x[2] / 2.2 + 0.5))
    image = (texture + 0.3 * soft(r2((13, 12, 11))) + 0.4 * soft(inner) * (1 + 0.5 * (x[0] > 0))
             + 0.3 * soft(r2((3, 3, 2), (4, -8, 5))))
    return _write(name, image, (inner < 1) * (1 + (x[0] > 0)), _AFFINE, work)


def _check_recovers_the_shift(warped, jacobian, ddf_file: Path, moving: dict, fixed: dict, min_dice: float) -> np.ndarray:
    """Labels back on the fixed ones (label values only, no folding), and the tool's whole transform (an ITK
    displacement field on the fixed grid, read as our pull-back DDF in voxels) = the 3-voxel shift along the first
    axis. Returns that DDF."""
    from bundle.io.itk_export import read_itk_displacement_field

    labels = {1: "a", 2: "b"}
    before = compare_baselines.score(moving["label_array"], fixed, None, labels)  # same grid: no resampling needed
    after = compare_baselines.score(warped, fixed, jacobian, labels)
    assert before["dice_mean"] < 0.4 and after["dice_mean"] > min_dice, (before["dice_mean"], after)
    assert set(np.unique(warped).tolist()) <= {0, 1, 2} and after["folding_pct"] == 0.0
    ddf, affine = read_itk_displacement_field(ddf_file)
    np.testing.assert_allclose(affine, _AFFINE, atol=1e-4)
    inside = fixed["label_array"] > 0
    assert np.median(ddf[0][inside]) == pytest.approx(3.0, abs=0.5)
    assert abs(np.median(ddf[1][inside])) < 0.5 and abs(np.median(ddf[2][inside])) < 0.5
    return ddf


def test_ants_syn_registers_a_shifted_phantom(tmp_path):
    """``ants_syn`` with real antspyx (all its defaults, about a second on this pair)."""
    pytest.importorskip("ants")
    moving, fixed = _phantom("moving", 3.0, tmp_path), _phantom("fixed", 0.0, tmp_path)
    warped, jacobian, seconds = compare_baselines.run_ants(moving, fixed, tmp_path)
    assert warped.dtype == np.int16 and warped.shape == jacobian.shape == (32, 32, 32) and seconds > 0
    composed = sorted(tmp_path.glob("ants_*.nii.gz"))
    assert len(composed) == 1, composed
    _check_recovers_the_shift(warped, jacobian, composed[0], moving, fixed, min_dice=0.95)
    assert np.median(jacobian[fixed["label_array"] > 0]) == pytest.approx(1.0, abs=0.1)  # a shift: no volume change


def test_elastix_registers_a_shifted_phantom(tmp_path, monkeypatch):
    """``elastix`` with real itk-elastix: the runner's default affine + B-spline maps, label reslicing (nearest
    neighbour), axis order and Jacobian (that of the deformation field transformix writes into ``work``). Faster
    optimisation than the defaults (which take over a minute on 2 busy cores): 32 instead of 256 iterations per
    resolution and 512 instead of 2048 samples, so the B-spline stage stops short (it still shrinks the inner
    ellipsoid by about 10 % per axis: no det J = 1 check here)."""
    itk = pytest.importorskip("itk")
    import importlib.util

    if importlib.util.find_spec("itk.ElastixPython") is None:
        pytest.skip("itk-elastix not installed")
    register, iterations = itk.elastix_registration_method, []

    def fewer_iterations(fixed_image, moving_image, parameter_object, **kwargs):
        for k in range(parameter_object.GetNumberOfParameterMaps()):
            iterations.append(parameter_object.GetParameter(k, "MaximumNumberOfIterations"))
            parameter_object.SetParameter(k, "MaximumNumberOfIterations", "32")
            parameter_object.SetParameter(k, "NumberOfSpatialSamples", "512")
        return register(fixed_image, moving_image, parameter_object=parameter_object, **kwargs)

    monkeypatch.setattr(itk, "elastix_registration_method", fewer_iterations)
    moving, fixed = _phantom("moving", 3.0, tmp_path), _phantom("fixed", 0.0, tmp_path)
    warped, jacobian, seconds = compare_baselines.run_elastix(moving, fixed, tmp_path)
    assert iterations == [("256",), ("256",)]  # the affine and B-spline defaults, both used
    assert warped.dtype == np.int16 and warped.shape == jacobian.shape == (32, 32, 32) and seconds > 0
    ddf = _check_recovers_the_shift(warped, jacobian, tmp_path / "deformationField.nii", moving, fixed, min_dice=0.75)
    from bundle.metrics import jacobian_determinant

    np.testing.assert_allclose(jacobian, jacobian_determinant(torch.as_tensor(ddf)[None])[0, 0].numpy(), atol=1e-4)


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


def test_split_pairs_limits_and_names_pairs_before_writing_any_subject(tmp_path):
    """``limit`` and ``only`` pick the pairs before subjects are written: only the named pairs' subjects are, and a
    name that is not a pair of the split is an error that writes nothing (not even the folder)."""
    data = _FakeDataset(["V", "W"])
    data.testing = ["E", "F", "G"]
    assert _names(compare_baselines.split_pairs(data, "testing", tmp_path / "a", limit=2)) == [("E", "F"), ("E", "G")]
    data.written.clear()
    pairs = compare_baselines.split_pairs(data, "testing", tmp_path / "b", only=["G_to_F"])
    assert _names(pairs) == [("G", "F")] and sorted(data.written) == ["F", "G"]
    data.written.clear()
    with pytest.raises(ValueError, match="--pair F_to_G: not a testing pair here; the pairs are E_to_F, E_to_G"):
        compare_baselines.split_pairs(data, "testing", tmp_path / "c", limit=2, only=["F_to_G"])
    assert data.written == [] and not (tmp_path / "c").exists()


def test_metadata_eval_metric_is_the_published_held_out_number():
    """``configs/metadata.json``'s ``eval_metrics`` are the shipped model's mean Dice over the IBSR and LPBA40 test
    pairs in docs/results/baselines.csv and baselines_lpba40.csv (method ``ours``), not placeholders."""
    import json

    meta = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    expected = {}
    for name, key in (("baselines.csv", "ibsr_test_mean_dice_csf_gm_wm"), ("baselines_lpba40.csv", "lpba40_test_mean_dice_56_structures")):
        rows = [r for r in csv.DictReader(open(REPO_ROOT / "docs" / "results" / name)) if r["method"] == "ours"]
        assert rows, f"no 'ours' rows in docs/results/{name}"
        expected[key] = round(float(np.mean([float(r["dice_mean"]) for r in rows])), 3)
    assert meta["eval_metrics"] == expected


def _rows(*specs) -> list[dict]:
    """Rows as ``results.csv`` gives them back (strings): ``(method, pair, dice_mean, {dice_<name>: v}, hd95_mm,
    folding_pct, sd_log_jacobian, seconds)``."""
    return [{"method": m, "pair": p, "dice_mean": str(d), **{k: str(v) for k, v in per_label.items()},
             "hd95_mm": str(hd), "folding_pct": str(fold), "sd_log_jacobian": str(sd), "seconds": str(s)}
            for m, p, d, per_label, hd, fold, sd, s in specs]


def test_summary_means_spreads_medians_and_speed_ratio():
    """Per method: mean ± population standard deviation over pairs (NaN pairs left out), median seconds, and the
    ratio of ANTs SyN's median seconds to the method's."""
    nan = float("nan")
    rows = _rows(("identity", "p1", 0.4, {"dice_a": 0.3, "dice_b": 0.5}, 5.0, 0.0, 0.0, 0.1),
                 ("identity", "p2", 0.6, {"dice_a": 0.5, "dice_b": 0.7}, 3.0, 0.0, 0.0, 0.3),
                 ("ants_syn", "p1", 0.8, {"dice_a": 0.7, "dice_b": nan}, 2.0, 0.1, 0.2, 40.0),
                 ("ants_syn", "p2", 0.9, {"dice_a": 0.9, "dice_b": 0.9}, 1.0, 0.3, 0.4, 60.0))
    identity, ants = compare_baselines._summary(rows, {1: "a", 2: "b"})
    assert identity == {"method": "identity", "pairs": 2, "dice_mean": "0.500 ± 0.100", "dice_a": "0.400 ± 0.100",
                        "dice_b": "0.600 ± 0.100", "hd95_mm": "4.000 ± 1.000", "folding_pct": "0.000 ± 0.000",
                        "sd_log_jacobian": "0.000 ± 0.000", "seconds (median)": "0.2",
                        "× faster than ANTs SyN": "250.0"}
    assert ants["dice_b"] == "0.900 ± 0.000" and ants["folding_pct"] == "0.200 ± 0.100"
    assert ants["seconds (median)"] == "50.0" and ants["× faster than ANTs SyN"] == "1.0"
    # more than 4 labels: no per-label columns (their own table); no ANTs rows: no speed ratio
    many = {k: f"s{k}" for k in range(1, 6)}
    (only,) = compare_baselines._summary(rows[:2], many)
    assert list(only) == ["method", "pairs", "dice_mean", "hd95_mm", "folding_pct", "sd_log_jacobian", "seconds (median)",
                          "× faster than ANTs SyN"]
    assert only["× faster than ANTs SyN"] == "–"


def test_per_structure_table_and_markdown():
    """Mean Dice per structure and method; '–' where a method never saw the structure; no row for a structure absent
    from every fixed map."""
    nan = float("nan")
    labels = {1: "L_a", 2: "R_a", 3: "b", 4: "c", 5: "never"}
    def per_label(l_a, r_a, b, c):
        return {"dice_L_a": l_a, "dice_R_a": r_a, "dice_b": b, "dice_c": c, "dice_never": nan}

    rows = _rows(("X", "p1", 0.5, per_label(0.4, nan, 0.6, nan), 1, 0, 0, 1),
                 ("X", "p2", 0.7, per_label(0.6, 0.8, nan, nan), 1, 0, 0, 1),
                 ("Y", "p1", 0.9, per_label(nan, nan, nan, 0.9), 1, 0, 0, 1))
    table = compare_baselines._per_structure(rows, labels, ["X", "Y"])
    assert table == [{"structure": "L_a", "X": "0.500", "Y": "–"}, {"structure": "R_a", "X": "0.800", "Y": "–"},
                     {"structure": "b", "X": "0.600", "Y": "–"}, {"structure": "c", "X": "–", "Y": "0.900"}]
    expected = "| structure | X | Y |\n|---|---|---|\n| L_a | 0.500 | – |\n| R_a | 0.800 | – |\n"
    assert compare_baselines._markdown(table[:2]) == expected


class Tiny:
    """A two-label data set for the report tests."""
    name = "tiny"
    labels = {1: "a", 2: "b"}

    def describe(self, section="testing"):
        return "Tiny: 2 labels"


def test_report_tables_the_pairs_every_method_ran(tmp_path, monkeypatch):
    """``report`` on a hand-made ``results.csv`` (written by ``_append``): the first table only over the pairs every
    method ran, then all pairs each method ran; the CSV copied next to it."""
    labels = Tiny.labels

    out = tmp_path / "run"
    out.mkdir()
    for method, pair, a, b, hd, seconds in (("ours", "m_to_f", 0.8, 0.6, 2.0, 1.0),
                                            ("ours", "f_to_m", 0.4, 0.6, 4.0, 3.0),
                                            ("ants_syn", "m_to_f", 0.9, 0.7, 1.0, 10.0)):
        row = {"method": method, "pair": pair, "moving": pair[0], "fixed": pair[-1], "dice_a": a, "dice_b": b,
               "dice_mean": (a + b) / 2, "hd95_mm": hd, "folding_pct": 0.0, "sd_log_jacobian": 0.0, "seconds": seconds,
               "hardware": "Test CPU"}
        compare_baselines._append(out / "results.csv", row, labels)
    monkeypatch.setattr(compare_baselines, "REPO", tmp_path)
    compare_baselines.report(Tiny(), out)
    text = (tmp_path / "docs" / "results" / "baselines_tiny.md").read_text()
    header = ("| method | pairs | dice_mean | dice_a | dice_b | hd95_mm | folding_pct | sd_log_jacobian "
              "| seconds (median) | × faster than ANTs SyN |\n|---|---|---|---|---|---|---|---|---|---|\n")
    zero = "0.000 ± 0.000"
    ants = f"| ants_syn | 1 | 0.800 ± 0.000 | 0.900 ± 0.000 | 0.700 ± 0.000 | 1.000 ± 0.000 | {zero} | {zero} | 10.0 | 1.0 |\n"
    assert text == (
        "Tiny: 2 labels; scored on the fixed image's native grid; mean ± standard deviation over pairs. "
        "Hardware: Test CPU.\n\nPairs every method ran (1: m_to_f):\n\n" + header
        + f"| ours | 1 | 0.700 ± 0.000 | 0.800 ± 0.000 | 0.600 ± 0.000 | 2.000 ± 0.000 | {zero} | {zero} | 1.0 | 10.0 |\n"
        + ants + "\nAll pairs each method ran:\n\n" + header
        + f"| ours | 2 | 0.600 ± 0.100 | 0.600 ± 0.200 | 0.600 ± 0.000 | 3.000 ± 1.000 | {zero} | {zero} | 2.0 | 5.0 |\n"
        + ants)
    assert (tmp_path / "docs" / "results" / "baselines_tiny.csv").read_text() == (out / "results.csv").read_text()
    with open(out / "results.csv") as f:
        assert next(csv.DictReader(f))["dice_mean"] == "0.7000"  # _append: floats with 4 decimals


def test_report_from_committed_csvs_compares_on_the_common_subset(tmp_path, monkeypatch):
    """``report --rows A,B --stem S``: rows of a method run on its own on a subset (B) joined to a whole run's (A), one
    row per method and pair (B's row replaces A's; the command can be re-run on its own output), the first table over
    the subset; files under the stem only; a file with other columns, or no stem, refused."""
    labels = Tiny.labels

    def rows(path, entries, hardware):
        for method, pair, a in entries:
            compare_baselines._append(path, {"method": method, "pair": pair, "moving": pair[0], "fixed": pair[-1],
                                             "dice_a": a, "dice_b": a, "dice_mean": a, "hd95_mm": 1.0, "folding_pct": 0.0,
                                             "sd_log_jacobian": 0.0, "seconds": 1.0, "hardware": hardware}, labels)

    whole, subset = tmp_path / "whole.csv", tmp_path / "subset.csv"
    rows(whole, [("ours", "m_to_f", 0.8), ("ours", "f_to_m", 0.4), ("greedy", "m_to_f", 0.7), ("greedy", "f_to_m", 0.5)], "CPU A")
    rows(subset, [("ants_syn_full", "m_to_f", 0.9), ("greedy", "m_to_f", 0.6)], "CPU B")
    monkeypatch.setattr(compare_baselines, "REPO", tmp_path)
    compare_baselines.report(Tiny(), tmp_path / "no_run", rows_from=[whole, subset], stem="subset_table")
    results = tmp_path / "docs" / "results"
    assert sorted(p.name for p in results.iterdir()) == ["subset_table.csv", "subset_table.md"]
    text = (results / "subset_table.md").read_text()
    assert "Hardware: CPU A (ours, greedy); CPU B (greedy, ants_syn_full)." in text
    assert "Pairs every method ran (1: m_to_f):" in text
    first = text.split("All pairs each method ran")[0]
    assert "| greedy | 1 | 0.600 ± 0.000 |" in first and "| ants_syn_full | 1 | 0.900 ± 0.000 |" in first
    assert "| ours | 1 | 0.800 ± 0.000 |" in first
    with open(results / "subset_table.csv") as f:
        merged = [(r["method"], r["pair"], r["dice_mean"]) for r in csv.DictReader(f)]
    assert merged == [("ours", "m_to_f", "0.8000"), ("ours", "f_to_m", "0.4000"), ("greedy", "m_to_f", "0.6000"),
                      ("greedy", "f_to_m", "0.5000"), ("ants_syn_full", "m_to_f", "0.9000")]
    # re-run from its own output: the same table
    compare_baselines.report(Tiny(), tmp_path / "no_run", rows_from=[results / "subset_table.csv", subset], stem="subset_table")
    assert (results / "subset_table.md").read_text().split("Hardware")[1] == text.split("Hardware")[1]
    with pytest.raises(ValueError, match="--stem"):
        compare_baselines.report(Tiny(), tmp_path / "no_run", rows_from=[whole, subset])
    other = tmp_path / "other.csv"
    other.write_text("method,pair,dice_mean\nours,m_to_f,0.5\n")
    with pytest.raises(ValueError, match="other.csv: its columns"):
        compare_baselines.read_rows([whole, other])
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        compare_baselines.read_rows([whole, tmp_path / "missing.csv"])


def test_validation_reports_name_the_validation_subjects_not_the_test_split():
    dataset = DATASETS["lpba40"]()
    validation = dataset.describe("validation")
    assert "validation" in validation and "S21, S22" in validation and "S01" not in validation
    assert "test split" in dataset.describe() and "S01, S23, S24, S25" in dataset.describe()


def test_method_summary_reads_the_results_csv_per_method(tmp_path):
    """benchmarks/method_summary.py (the lines the retime and λ scripts print): per method, in order of appearance."""
    import method_summary

    path = tmp_path / "results.csv"
    fields = ["method", "pair", "dice_mean", "folding_pct", "sd_log_jacobian", "seconds", "hardware"]
    rows = [("b", "p1", 0.5, 0.0, 0.2, 10.0), ("a", "p1", 0.7, 0.01, 0.3, 1.0), ("b", "p2", 0.7, 0.02, 0.4, 30.0)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows([(*r, "cpu") for r in rows])
    lines = method_summary.summarise(str(path))
    assert [line.split(": ")[1] for line in lines] == ["b", "a"]
    assert "2 pairs, mean Dice 0.6000, folding mean 0.01000 % max 0.0200 %, SDlogJ 0.300, median 20.0 s" in lines[0]
    assert "1 pairs, mean Dice 0.7000" in lines[1]


def test_refinement_speed_times_a_warp_with_its_gradient():
    """benchmarks/refinement_speed.py's grid_sample timing: the sampler is called on the volume and its grid, and
    the gradient flows (a sampler that ignored the grid would fail the backward pass)."""
    import refinement_speed

    calls = []

    def sample(image, grid):
        calls.append((tuple(image.shape), tuple(grid.shape)))
        return torch.nn.functional.grid_sample(image, grid, align_corners=True)

    seconds = refinement_speed.time_grid_sample(sample, repeats=1)
    assert seconds > 0 and calls == [((1, 1, 160, 192, 160), (1, 135, 171, 130, 3))] * 2
