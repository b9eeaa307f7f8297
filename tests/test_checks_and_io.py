"""Tests for bundle.transforms.checks, bundle.io and bundle.engines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import CheckpointSaver

from bundle.engines import (
    RegistrationPrepareBatch,
    ResumeFromLatest,
    key_metric_score,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
)
from bundle.io import LoadImaged, load_pairs, write_nifti
from bundle.io import writers
from bundle.io.writers import CommitOutputsd, SaveNiftid, staging_folder, writable_folder
from bundle.transforms import CheckFinited, CheckLabeld, CheckMemoryd, CheckPaird
from bundle.transforms.checks import MEMORY_BYTES_PER_NATIVE_REFINED_VOXEL, estimate_memory_bytes


def _meta(array, name: str) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array), meta={"filename_or_obj": name})


# ---------------------------------------------------------------- checks


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_check_finite_names_the_file(bad):
    img = torch.rand(1, 4, 4, 4)
    img[0, 1, 2, 3] = bad
    img[0, 0, 0, 0] = bad
    data = {"moving": _meta(img, "/data/sub-01_T1w.nii.gz"), "fixed": torch.rand(1, 4, 4, 4)}
    with pytest.raises(ValueError, match=r"moving \(/data/sub-01_T1w\.nii\.gz\): 2 NaN/Inf"):
        CheckFinited(["moving", "fixed"])(data)


def test_check_finite_passes_finite_images_unchanged():
    data = {"moving": _meta(torch.rand(1, 4, 4), "a.nii"), "fixed": torch.rand(1, 4, 4)}
    out = CheckFinited(["moving", "fixed"])(data)
    assert out["moving"] is data["moving"] and out["fixed"] is data["fixed"]
    # without file metadata the key names the item
    with pytest.raises(ValueError, match=r"^fixed: 1 NaN"):
        CheckFinited("fixed")({"fixed": torch.tensor([[float("nan"), 1.0]])})


@pytest.mark.parametrize("value", (0.0, 3.5))
def test_check_finite_rejects_blank_and_empty_images(value):
    """An all-zero (or any constant) image is an error whatever the pre-alignment: nothing to register."""
    blank = torch.full((2, 4, 4, 4), value)
    with pytest.raises(ValueError, match=r"moving \(/data/blank\.nii\.gz\): channel 0 is constant \(every voxel " + f"{value:g}"):
        CheckFinited("moving")({"moving": _meta(blank, "/data/blank.nii.gz")})
    with pytest.raises(ValueError, match=f"channel 0 is constant \\(every voxel {value:g}"):
        CheckFinited("moving")({"moving": torch.full((1, 4, 4, 4), value)})


def test_check_finite_checks_the_2d_block_of_a_2d_images_affine():
    """A 2-D image whose 3-D header swaps its second axis out of the plane: the 4x4 affine is invertible but the
    2-D block that MONAI's spatial transforms use is singular (Orientationd's unclear "Unable to find out axis")."""
    image = MetaTensor(torch.rand(1, 5, 6), affine=torch.tensor([[2.0, 0, 0, 0], [0, 0, 2, 0], [0, 2, 0, 0], [0, 0, 0, 1]]),
                       meta={"filename_or_obj": "/data/slice.nii.gz"})
    with pytest.raises(ValueError, match=r"moving \(/data/slice\.nii\.gz\): the voxel-to-world affine .* singular"):
        CheckFinited("moving")({"moving": image})
    image.affine = torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0]))  # in-plane axes: accepted
    assert CheckFinited("moving")({"moving": image})["moving"] is image


def test_check_finite_accepts_a_missing_sequence_but_not_another_constant_channel():
    """An all-zero channel beside a real one is a missing sequence (no FLAIR); a non-zero constant channel is not."""
    image = torch.zeros(3, 4, 4, 4)
    image[0] = torch.rand(4, 4, 4)
    data = {"moving": _meta(image, "/data/t1c_only.nii.gz")}
    assert CheckFinited("moving")(data)["moving"] is data["moving"]
    image[2] = 3.5
    with pytest.raises(ValueError, match=r"channel 2 is constant \(every voxel 3\.5"):
        CheckFinited("moving")({"moving": _meta(image, "/data/t1c_only.nii.gz")})
    with pytest.raises(ValueError, match="no voxels"):
        CheckFinited("moving")({"moving": torch.zeros(1, 0, 4, 4)})


def test_check_label_casts_integral_floats_to_int64():
    label = _meta(torch.tensor([[[0.0, 1.0], [2.0, 1.0]]]), "lab.nii.gz")
    out = CheckLabeld("label", num_classes=3)({"label": label})["label"]
    assert out.dtype == torch.int64
    assert torch.equal(out.as_tensor(), torch.tensor([[[0, 1], [2, 1]]]))
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "lab.nii.gz"
    # integer labels are kept as they are
    ints = torch.tensor([[0, 3]], dtype=torch.uint8)
    assert CheckLabeld("label")({"label": ints})["label"].dtype == torch.uint8


@pytest.mark.parametrize(
    "values, num_classes, match",
    [
        ([0.0, 1.5], None, "integers"),
        ([0.0, float("nan")], None, "integers"),
        ([0.0, -1.0], None, ">= 0"),
        ([0, -2], None, ">= 0"),
        ([0, 3], 3, "num_classes=3"),
        ([0.0, 4.0], 3, "num_classes=3"),
    ],
)
def test_check_label_rejects_bad_values(values, num_classes, match):
    label = _meta(torch.tensor([values]), "/x/seg.nii.gz")
    with pytest.raises(ValueError, match=match) as err:
        CheckLabeld("moving_label", num_classes=num_classes)({"moving_label": label})
    assert "seg.nii.gz" in str(err.value)


def test_check_label_missing_keys():
    assert CheckLabeld("fixed_label", allow_missing_keys=True)({"x": 1}) == {"x": 1}
    with pytest.raises(KeyError):
        CheckLabeld("fixed_label")({"x": 1})


def test_check_pair_accepts_compatible_items():
    data = {
        "moving": torch.zeros(2, 4, 5, 6),
        "fixed": torch.zeros(2, 7, 8, 9),  # spatial sizes may differ (resampled later)
        "moving_label": torch.zeros(1, 4, 5, 6),
    }
    assert CheckPaird()(data) == data


@pytest.mark.parametrize(
    "data, match",
    [
        ({"moving": torch.zeros(1, 4, 4), "fixed": torch.zeros(1, 4, 4, 4)}, "is 2D but"),
        ({"moving": torch.zeros(1, 4, 4, 4), "fixed": torch.zeros(2, 4, 4, 4)}, "1 channels but"),
        ({"moving": torch.zeros(1, 4), "fixed": torch.zeros(1, 4)}, "2D or 3D"),
        ({"moving": torch.zeros(1, 2, 2, 2, 2), "fixed": torch.zeros(1, 2, 2, 2, 2)}, "2D or 3D"),
        (
            {"moving": torch.zeros(1, 4, 4, 4), "fixed": torch.zeros(1, 4, 4, 4), "fixed_label": torch.zeros(1, 4, 4, 5)},
            r"fixed_label has shape \(1, 4, 4, 5\)",
        ),
        (
            {"moving": torch.zeros(1, 4, 4, 4), "fixed": torch.zeros(1, 4, 4, 4), "moving_label": torch.zeros(2, 4, 4, 4)},
            "moving_label has shape",
        ),
    ],
)
def test_check_pair_rejects_mismatches(data, match):
    with pytest.raises(ValueError, match=match):
        CheckPaird()(data)


def test_check_pair_names_files_and_needs_two_keys():
    data = {"moving": _meta(torch.zeros(1, 4, 4), "m.nii"), "fixed": _meta(torch.zeros(1, 4, 4, 4), "f.nii")}
    with pytest.raises(ValueError, match=r"moving \(m\.nii\) is 2D but fixed \(f\.nii\) is 3D"):
        CheckPaird()(data)
    with pytest.raises(ValueError):
        CheckPaird(keys=("a", "b", "c"))


# ---------------------------------------------------------------- datalist


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b", "c", "atlas"):
        for suffix in ("t1", "t2", "seg"):
            (folder / f"{name}_{suffix}.nii.gz").write_bytes(b"x")
    (tmp_path / "lists").mkdir()
    return tmp_path


def _datalist(root: Path, content, name="dl.json") -> Path:
    path = root / "lists" / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _f(root: Path, name: str) -> str:
    return str((root / "data" / name).resolve())


def _norm(obj):
    """Pairs with every path normalised (load_pairs returns absolute, not necessarily normalised, paths)."""
    if isinstance(obj, list):
        return [_norm(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _norm(v) if k != "name" else v for k, v in obj.items()}
    assert os.path.isabs(obj), obj
    return os.path.realpath(obj)


def test_load_pairs_explicit_relative_paths_and_default_names(data_dir):
    path = _datalist(
        data_dir,
        {
            "training": [
                {"moving": "../data/a_t1.nii.gz", "fixed": "../data/b_t1.nii.gz", "moving_label": "../data/a_seg.nii.gz"},
                {"moving": _f(data_dir, "c_t1.nii.gz"), "fixed": "../data/a_t1.nii.gz", "name": "c2a"},
            ]
        },
    )
    pairs = _norm(load_pairs(path))
    assert pairs == [
        {
            "moving": _f(data_dir, "a_t1.nii.gz"),
            "fixed": _f(data_dir, "b_t1.nii.gz"),
            "moving_label": _f(data_dir, "a_seg.nii.gz"),
            "name": "0",
        },
        {"moving": _f(data_dir, "c_t1.nii.gz"), "fixed": _f(data_dir, "a_t1.nii.gz"), "name": "c2a"},
    ]


def test_load_pairs_multichannel_lists_are_kept(data_dir):
    path = _datalist(
        data_dir,
        {"validation": [{"moving": ["../data/a_t1.nii.gz", "../data/a_t2.nii.gz"], "fixed": ["../data/b_t1.nii.gz", "../data/b_t2.nii.gz"]}]},
    )
    (pair,) = _norm(load_pairs(path, section="validation"))
    assert pair["moving"] == [_f(data_dir, "a_t1.nii.gz"), _f(data_dir, "a_t2.nii.gz")]
    assert pair["fixed"] == [_f(data_dir, "b_t1.nii.gz"), _f(data_dir, "b_t2.nii.gz")]
    assert pair["name"] == "0"


def test_load_pairs_atlas(data_dir):
    content = {
        "pairing": "atlas",
        "atlas": {"image": "../data/atlas_t1.nii.gz", "label": "../data/atlas_seg.nii.gz", "name": "mni"},
        "training": [{"image": "../data/a_t1.nii.gz", "label": "../data/a_seg.nii.gz", "name": "a"}, {"image": "../data/b_t1.nii.gz"}],
    }
    pairs = _norm(load_pairs(_datalist(data_dir, content)))
    assert pairs == [
        {
            "moving": _f(data_dir, "a_t1.nii.gz"),
            "fixed": _f(data_dir, "atlas_t1.nii.gz"),
            "moving_label": _f(data_dir, "a_seg.nii.gz"),
            "fixed_label": _f(data_dir, "atlas_seg.nii.gz"),
            "name": "a_to_atlas",
        },
        {
            "moving": _f(data_dir, "b_t1.nii.gz"),
            "fixed": _f(data_dir, "atlas_t1.nii.gz"),
            "fixed_label": _f(data_dir, "atlas_seg.nii.gz"),
            "name": "1_to_atlas",
        },
    ]


def test_brain_masks_are_paths_that_follow_their_images(data_dir):
    """``brain_mask`` of a subject becomes ``moving_brain_mask`` / ``fixed_brain_mask`` of its pairs, resolved like
    the images; a pair's ``fixed_brain_mask`` is the ``brain_mask`` of the image segmented from it; a missing one is
    named."""
    from bundle.io import load_subjects

    content = {"pairing": "atlas", "atlas": {"image": "../data/atlas_t1.nii.gz", "brain_mask": "../data/atlas_seg.nii.gz"},
               "training": [{"image": "../data/a_t1.nii.gz", "brain_mask": "../data/a_seg.nii.gz", "name": "a"}]}
    (pair,) = _norm(load_pairs(_datalist(data_dir, content)))
    assert pair["moving_brain_mask"] == _f(data_dir, "a_seg.nii.gz")
    assert pair["fixed_brain_mask"] == _f(data_dir, "atlas_seg.nii.gz")
    explicit = {"testing": [{"moving": "../data/a_t1.nii.gz", "fixed": "../data/b_t1.nii.gz", "fixed_brain_mask": "../data/b_seg.nii.gz"}]}
    (subject,) = load_subjects(_datalist(data_dir, explicit, "explicit.json"))
    assert Path(subject["image"]).name == "b_t1.nii.gz" and Path(subject["brain_mask"]).name == "b_seg.nii.gz"
    missing = {"testing": [{"image": "../data/a_t1.nii.gz", "brain_mask": "../data/none.nii.gz"}]}
    with pytest.raises(FileNotFoundError, match="brain_mask"):
        load_subjects(_datalist(data_dir, missing, "missing.json"))


def test_load_pairs_all_ordered_pairs(data_dir):
    subjects = [{"image": f"../data/{s}_t1.nii.gz", "label": f"../data/{s}_seg.nii.gz", "name": s} for s in "abc"]
    subjects[2].pop("name")
    path = _datalist(data_dir, {"training": subjects})
    pairs = _norm(load_pairs(path, pairing="all"))
    n = len(subjects)
    assert len(pairs) == n * (n - 1) == 6
    assert [p["name"] for p in pairs] == ["a_to_b", "a_to_2", "b_to_a", "b_to_2", "2_to_a", "2_to_b"]
    assert {(p["moving"], p["fixed"]) for p in pairs} == {
        (_f(data_dir, f"{m}_t1.nii.gz"), _f(data_dir, f"{f}_t1.nii.gz")) for m in "abc" for f in "abc" if m != f
    }
    assert all(p["moving_label"] == p["moving"].replace("_t1", "_seg") for p in pairs)
    assert all(p["fixed_label"] == p["fixed"].replace("_t1", "_seg") for p in pairs)
    # only one subject: no pairs
    with pytest.raises(ValueError, match="no pairs"):
        load_pairs(_datalist(data_dir, {"training": subjects[:1]}, "one.json"), pairing="all")


def test_load_pairs_missing_file_is_named(data_dir):
    path = _datalist(data_dir, {"training": [{"moving": "../data/a_t1.nii.gz", "fixed": "../data/zz_t1.nii.gz"}]})
    with pytest.raises(FileNotFoundError, match=r"zz_t1\.nii\.gz"):
        load_pairs(path)
    # without the check, the path is resolved anyway
    (pair,) = load_pairs(path, check_files=False)
    assert os.path.isabs(pair["fixed"])
    assert os.path.realpath(pair["fixed"]) == _f(data_dir, "zz_t1.nii.gz")
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        load_pairs(data_dir / "lists" / "nope.json")


@pytest.mark.parametrize(
    "content, kwargs, match",
    [
        ({"training": []}, {}, "no entries"),
        ({"validation": [{"moving": "x", "fixed": "y"}]}, {}, "no entries"),
        ("{not json", {}, "not valid JSON"),
        ([1, 2], {}, "JSON object"),
        ({"training": [{"moving": "../data/a_t1.nii.gz", "fixed": "../data/b_t1.nii.gz"}]}, {"pairing": "random"}, "pairing"),
        ({"pairing": "pairs", "training": [{"moving": "../data/a_t1.nii.gz"}]}, {}, "pairing"),
        ({"training": [{"moving": "../data/a_t1.nii.gz"}]}, {}, "missing"),
        ({"pairing": "atlas", "training": [{"image": "../data/a_t1.nii.gz"}]}, {}, "atlas"),
        ({"training": ["../data/a_t1.nii.gz"]}, {}, "expected an object"),
        ({"training": [{"moving": 3, "fixed": "../data/b_t1.nii.gz"}]}, {}, "file path"),
    ],
)
def test_load_pairs_malformed_datalists(data_dir, content, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_pairs(_datalist(data_dir, content), **kwargs)


# ---------------------------------------------------------------- NIfTI writing


AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 2.0, 0, -10.0], [0, 0, 1.2, 5.0], [0, 0, 0, 1]])


def test_write_nifti_image_atomic_and_affine(tmp_path):
    out = tmp_path / "sub" / "warped.nii.gz"
    array = np.random.default_rng(0).random((1, 5, 6, 7)).astype(np.float32)
    write_nifti(array, AFFINE, out)
    assert sorted(os.listdir(out.parent)) == ["warped.nii.gz"]  # no temporary file left
    img = nib.load(str(out))
    assert img.shape == (5, 6, 7)
    np.testing.assert_allclose(img.affine, AFFINE)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), array[0])


def test_write_nifti_multichannel_and_vector_field(tmp_path):
    array = np.random.default_rng(1).random((3, 5, 6, 7)).astype(np.float32)
    write_nifti(array, AFFINE, tmp_path / "channels.nii.gz")
    img = nib.load(str(tmp_path / "channels.nii.gz"))
    assert img.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[..., 2], array[2])

    write_nifti(array, AFFINE, tmp_path / "ddf.nii.gz", vector=True)
    img = nib.load(str(tmp_path / "ddf.nii.gz"))
    assert img.shape == (5, 6, 7, 1, 3)
    assert img.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(img.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[1, 2, 3, 0], array[:, 1, 2, 3])
    assert sorted(os.listdir(tmp_path)) == ["channels.nii.gz", "ddf.nii.gz"]


def test_spatially_reversed_copy_matches_permute():
    """The tiled copy the writer uses is torch's permuted copy, for sizes that are and are not tile multiples."""
    from bundle.io.writers import _spatially_reversed

    for shape in [(3, 40, 7, 33), (1, 16, 16, 16), (2, 5, 6), (1, 1, 1, 1)]:
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        expected = tensor.permute(0, *range(tensor.ndim - 1, 0, -1)).contiguous()
        found = _spatially_reversed(tensor)
        assert found.is_contiguous() and torch.equal(found, expected)
    labels = torch.randint(0, 60, (1, 20, 9, 35), dtype=torch.int16)
    assert torch.equal(_spatially_reversed(labels), labels.permute(0, 3, 2, 1).contiguous())


def test_write_nifti_2d_vector_field_and_3x3_affine(tmp_path):
    array = np.random.default_rng(2).random((2, 4, 5)).astype(np.float32)
    affine = np.array([[2.0, 0, 7.0], [0, -3.0, 1.0], [0, 0, 1]])
    write_nifti(array, affine, tmp_path / "ddf2d.nii", vector=True)
    img = nib.load(str(tmp_path / "ddf2d.nii"))
    assert img.shape == (4, 5, 1, 1, 2)
    expected = np.eye(4)
    expected[:2, :2], expected[:2, 3] = affine[:2, :2], affine[:2, 2]
    np.testing.assert_allclose(img.affine, expected)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[3, 4, 0, 0], array[:, 3, 4])


def test_write_nifti_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(image, filename):
        Path(filename).write_bytes(b"partial")  # a half-written file
        raise OSError("disk full")

    monkeypatch.setattr(writers.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(np.zeros((1, 3, 3, 3), np.float32), np.eye(4), tmp_path / "out.nii.gz")
    assert os.listdir(tmp_path) == []


def test_write_nifti_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    write_nifti(np.ones((1, 3, 3, 3), np.float32), np.eye(4), target)

    def broken_save(image, filename):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(writers.nib, "save", broken_save)
    with pytest.raises(RuntimeError):
        write_nifti(np.zeros((1, 3, 3, 3), np.float32), np.eye(4), target)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out.nii.gz"]
    np.testing.assert_array_equal(nib.load(str(target)).get_fdata(), np.ones((3, 3, 3)))


def test_write_nifti_file_mode_honours_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_nifti(np.zeros((1, 3, 3, 3), np.float32), np.eye(4), tmp_path / "out.nii.gz")
    finally:
        os.umask(old)
    assert (tmp_path / "out.nii.gz").stat().st_mode & 0o777 == 0o644


def test_write_nifti_int64_label_map(tmp_path):
    label = np.array([[[[0, 1], [2, 300]]]], dtype=np.int64)
    write_nifti(label, np.eye(4), tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj), label[0])


def test_save_niftid_writes_one_folder_per_pair(tmp_path):
    ddf = MetaTensor(torch.rand(3, 5, 6, 7), affine=torch.as_tensor(AFFINE))
    warped = torch.rand(1, 5, 6, 7)
    label = torch.randint(0, 3, (1, 5, 6, 7))
    data = {"pred": ddf, "warped_moving": warped, "warped_moving_label": label, "name": "a_to_b"}
    saver = SaveNiftid(
        ["pred", "warped_moving", "warped_moving_label", "missing"],
        ["ddf.nii.gz", "warped.nii.gz", "warped_seg.nii.gz", "x.nii.gz"],
        output_dir=tmp_path,
        dtypes={"warped_moving_label": "uint8"},
        allow_missing_keys=True,
    )
    assert saver(data) == data
    folder = tmp_path / "a_to_b"
    assert sorted(os.listdir(folder)) == ["ddf.nii.gz", "warped.nii.gz", "warped_seg.nii.gz"]
    img = nib.load(str(folder / "ddf.nii.gz"))
    assert img.shape == (5, 6, 7, 1, 3) and img.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(img.affine, AFFINE)
    w = nib.load(str(folder / "warped.nii.gz"))
    assert w.shape == (5, 6, 7)
    np.testing.assert_allclose(w.affine, AFFINE)
    np.testing.assert_allclose(w.get_fdata(), warped[0].numpy(), atol=1e-7)
    seg = nib.load(str(folder / "warped_seg.nii.gz"))
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(seg.dataobj), label[0].numpy())


def test_save_niftid_plain_reference_and_bad_filenames(tmp_path):
    SaveNiftid(["pred"], ["ddf.nii.gz"], tmp_path, name_key="id")({"pred": torch.zeros(3, 4, 4, 4), "id": 7})
    img = nib.load(str(tmp_path / "7" / "ddf.nii.gz"))
    np.testing.assert_allclose(img.affine, np.eye(4))
    with pytest.raises(ValueError, match="one file name per key"):
        SaveNiftid(["pred", "warped"], ["ddf.nii.gz"], tmp_path)


def test_staged_outputs_replace_a_pair_folder_as_a_whole(tmp_path):
    """Staged writing + ``CommitOutputsd``: a re-run replaces the pair's folder whole (no stale file of the
    earlier run stays beside the new ones); a run that fails before the commit leaves the old folder untouched
    and only a hidden staging folder, which the next run of the pair clears."""
    old = tmp_path / "p1"
    old.mkdir()
    (old / "ddf.nii.gz").write_text("old")
    (old / "seg_fixed.nii.gz").write_text("old output this run does not write")
    (old / writers.OUTPUTS_MANIFEST).write_text(json.dumps(["ddf.nii.gz", "seg_fixed.nii.gz"]))  # an earlier run's
    item = {"pred": torch.zeros(3, 4, 4, 4), "name": "p1"}
    save = SaveNiftid(["pred"], ["ddf.nii.gz"], tmp_path, staged=True)
    save(item)
    assert sorted(p.name for p in old.iterdir()) == [writers.OUTPUTS_MANIFEST, "ddf.nii.gz", "seg_fixed.nii.gz"]
    assert (old / "ddf.nii.gz").read_text() == "old" and (staging_folder(old) / "ddf.nii.gz").is_file()
    save(item)  # a killed run's staging folder is emptied and rewritten, not mixed
    CommitOutputsd(tmp_path)(item)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1"]  # no staging or old folder left
    assert sorted(p.name for p in old.iterdir()) == [writers.OUTPUTS_MANIFEST, "ddf.nii.gz"]
    assert writers.written_outputs(old) == ["ddf.nii.gz"]
    nib.load(str(old / "ddf.nii.gz"))  # the new file
    CommitOutputsd(tmp_path)({"name": "nothing_staged"})  # writers left out (MONAI Label): no-op
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1"]


def test_a_commit_killed_between_its_renames_is_undone_by_the_next(tmp_path):
    """A kill after the earlier folder was set aside (``.out.old-<pid>``) and before the staged one took its place
    leaves no ``out``; the next commit puts the earlier folder back first, so the user's file survives."""
    aside = tmp_path / ".out.old-99999"
    aside.mkdir()
    (aside / "keep_me.txt").write_text("mine")
    (aside / "ddf.nii.gz").write_text("old")
    (aside / writers.OUTPUTS_MANIFEST).write_text(json.dumps(["ddf.nii.gz"]))
    item = {"pred": torch.zeros(3, 4, 4, 4), "name": "out"}
    SaveNiftid(["pred"], ["ddf.nii.gz"], tmp_path, staged=True)(item)
    CommitOutputsd(tmp_path)(item)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [writers.OUTPUTS_MANIFEST, "ddf.nii.gz", "keep_me.txt"]
    assert (tmp_path / "out" / "keep_me.txt").read_text() == "mine"
    nib.load(str(tmp_path / "out" / "ddf.nii.gz"))  # the new output


def test_committing_outputs_keeps_the_users_own_files(tmp_path):
    """An output folder that also holds the user's files (never written by a run) keeps them: only outputs are
    replaced (a same-named file is an output's place and is replaced, as documented)."""
    folder = tmp_path / "out"
    (folder / "subdir").mkdir(parents=True)
    (folder / "keep_me.txt").write_text("mine")
    (folder / "subdir" / "notes.txt").write_text("mine too")
    (folder / "ddf.nii.gz").write_text("the user's file in an output's place")
    item = {"pred": torch.zeros(3, 4, 4, 4), "name": "out"}
    SaveNiftid(["pred"], ["ddf.nii.gz"], tmp_path, staged=True)(item)
    CommitOutputsd(tmp_path)(item)
    assert (folder / "keep_me.txt").read_text() == "mine" and (folder / "subdir" / "notes.txt").read_text() == "mine too"
    nib.load(str(folder / "ddf.nii.gz"))
    assert writers.written_outputs(folder) == ["ddf.nii.gz"]
    SaveNiftid(["pred"], ["warped.nii.gz"], tmp_path, staged=True)(item)  # a re-run writing another output
    CommitOutputsd(tmp_path)(item)
    assert sorted(p.name for p in folder.iterdir()) == [writers.OUTPUTS_MANIFEST, "keep_me.txt", "subdir", "warped.nii.gz"]


def test_writable_folder_names_the_blocking_path(tmp_path):
    assert writable_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # created later
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=r"output folder .*out: .*file\.txt is not a folder"):
        writable_folder(tmp_path / "file.txt" / "out")


# ---------------------------------------------------------------- prepare batch / scores


def test_prepare_batch_without_labels():
    moving, fixed = torch.rand(2, 1, 4, 4, 4), torch.rand(2, 1, 4, 4, 4)
    batch = {"moving": MetaTensor(moving), "fixed": MetaTensor(fixed), "name": ["a", "b"]}
    inputs, targets = RegistrationPrepareBatch()(batch)
    assert inputs.shape == (2, 2, 4, 4, 4)
    assert torch.equal(inputs[:, :1], moving) and torch.equal(inputs[:, 1:], fixed)
    assert not isinstance(inputs, MetaTensor)
    assert set(targets) == {"moving", "fixed"}
    assert torch.equal(targets["moving"], moving) and torch.equal(targets["fixed"], fixed)


def test_prepare_batch_with_labels_and_custom_keys():
    batch = {
        "m": torch.rand(1, 2, 4, 4),
        "f": torch.rand(1, 2, 4, 4),
        "moving_label": torch.ones(1, 1, 4, 4),
        "fixed_label": torch.zeros(1, 1, 4, 4),
    }
    inputs, targets = RegistrationPrepareBatch(moving_key="m", fixed_key="f")(batch, device="cpu")
    assert torch.equal(inputs, torch.cat([batch["m"], batch["f"]], dim=1))
    assert set(targets) == {"moving", "fixed", "moving_label", "fixed_label"}
    assert torch.equal(targets["moving_label"], batch["moving_label"])
    only_moving = {k: v for k, v in batch.items() if k != "fixed_label"}
    assert set(RegistrationPrepareBatch("m", "f")(only_moving)[1]) == {"moving", "fixed", "moving_label"}
    with pytest.raises(KeyError, match="fixed"):
        RegistrationPrepareBatch()({"moving": torch.zeros(1, 1, 2, 2)})


def test_key_metric_score():
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"dice": 0.75, "tre": 3.0}
    engine.state.key_metric_name = "dice"
    assert key_metric_score(engine) == 0.75


# ---------------------------------------------------------------- checkpoints


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(ValueError, match="unreadable") as error:
        load_checkpoint(garbage)
    assert str(garbage) in str(error.value) and "file an issue" not in str(error.value)  # torch's preamble is dropped
    assert "not a PyTorch checkpoint" in str(error.value) and "\n" not in str(error.value)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError, match="list"):
        load_checkpoint(listed)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3)}, good)
    assert torch.equal(load_checkpoint(good)["w"], torch.arange(3))


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("wrap", ("plain", "module", "network", "model"))
def test_load_weights_formats(tmp_path, wrap):
    src = _net(0)
    state = src.state_dict()
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap in ("network", "model"):
        state = {wrap: state, "optimizer": {"lr": 0.1}}
    torch.save(state, tmp_path / "w.pt")
    dst = _net(1)
    assert not torch.equal(dst[0].weight, src[0].weight)
    assert load_weights(dst, tmp_path / "w.pt") is dst
    for a, b in zip(dst.state_dict().values(), src.state_dict().values()):
        assert torch.equal(a, b)


def test_load_weights_mismatch_raises(tmp_path):
    torch.save(torch.nn.Linear(5, 5).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(_net(0), tmp_path / "w.pt")


def _trainer(net, opt, data):
    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return Engine(step)


def test_resume_from_latest_restores_network_optimizer_and_trainer(tmp_path):
    data = [torch.rand(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    net = _net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = _trainer(net, opt, data)
    CheckpointSaver(str(tmp_path), {"network": net, "optimizer": opt, "trainer": trainer}, save_interval=1).attach(trainer)
    trainer.run(data, max_epochs=3)
    files = sorted(p.name for p in tmp_path.glob("checkpoint*.pt"))
    assert files == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    # make epoch 2 the newest file: resuming picks by modification time
    for i, name in enumerate(("checkpoint_epoch=1.pt", "checkpoint_epoch=3.pt", "checkpoint_epoch=2.pt")):
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))
    torch.save({"network": {}}, tmp_path / "model.pt")  # other prefixes are ignored
    os.utime(tmp_path / "model.pt", (2_000_000, 2_000_000))
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=2.pt"
    saved = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)

    net2 = _net(1)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05, momentum=0.9)
    trainer2 = _trainer(net2, opt2, data)
    ResumeFromLatest(tmp_path, {"network": net2, "optimizer": opt2, "trainer": trainer2}).attach(trainer2)
    seen = {}

    @trainer2.on(Events.STARTED)
    def _snapshot(engine):
        seen["epoch"], seen["iteration"] = engine.state.epoch, engine.state.iteration
        seen["weights"] = {k: v.clone() for k, v in net2.state_dict().items()}
        seen["momentum"] = [opt2.state[p]["momentum_buffer"].clone() for p in net2.parameters()]

    iterations = []
    trainer2.on(Events.ITERATION_COMPLETED)(lambda e: iterations.append(e.state.iteration))
    trainer2.run(data, max_epochs=4)

    assert seen["epoch"] == 2 and seen["iteration"] == 2 * len(data)
    for k, v in saved["network"].items():
        assert torch.equal(seen["weights"][k], v)
    saved_momentum = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(seen["momentum"], saved_momentum))
    # training continued from epoch 2 to 4
    assert iterations == list(range(2 * len(data) + 1, 4 * len(data) + 1))


def test_latest_checkpoint_breaks_a_modification_time_tie_by_the_number_in_the_name(tmp_path):
    """Checkpoints saved within one clock tick share a modification time: the largest epoch is the newest."""
    for name in ("checkpoint_epoch=10.pt", "checkpoint_epoch=2.pt", "checkpoint_epoch=9.pt"):
        torch.save({"network": {}}, tmp_path / name)
        os.utime(tmp_path / name, (1_000_000, 1_000_000))
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=10.pt"
    os.utime(tmp_path / "checkpoint_epoch=2.pt", (1_000_001, 1_000_001))  # a later time still wins
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=2.pt"


def test_resuming_a_run_at_its_epoch_budget_trains_nothing(tmp_path):
    """A run resumed from its final checkpoint ends at once: the campaign then marks it finished."""
    data = [torch.rand(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    net = _net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    trainer = _trainer(net, opt, data)
    CheckpointSaver(str(tmp_path), {"network": net, "optimizer": opt, "trainer": trainer}, save_interval=1).attach(trainer)
    trainer.run(data, max_epochs=2)
    final = {k: v.clone() for k, v in net.state_dict().items()}
    net2 = _net(1)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05)
    trainer2 = _trainer(net2, opt2, data)
    ResumeFromLatest(tmp_path, {"network": net2, "optimizer": opt2, "trainer": trainer2}).attach(trainer2)
    iterations = []
    trainer2.on(Events.ITERATION_COMPLETED)(lambda e: iterations.append(e.state.iteration))
    trainer2.run(data, max_epochs=2)
    assert iterations == [] and trainer2.state.epoch == 2
    for k, v in final.items():
        assert torch.equal(net2.state_dict()[k], v)


@pytest.mark.parametrize("case", ("empty", "missing", "disabled"))
def test_resume_from_latest_without_checkpoint_starts_from_scratch(tmp_path, case):
    folder = tmp_path / "ckpt"
    if case != "missing":
        folder.mkdir()
    if case == "disabled":
        other = _net(5)
        torch.save({"network": other.state_dict()}, folder / "checkpoint_epoch=9.pt")
    net = _net(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    data = [torch.rand(2, 3)]
    trainer = _trainer(net, opt, data)
    ResumeFromLatest(folder, {"network": net, "trainer": trainer}, enabled=case != "disabled").attach(trainer)
    seen = {}

    @trainer.on(Events.STARTED)
    def _snapshot(engine):
        seen["epoch"] = engine.state.epoch
        seen["equal"] = all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    trainer.run(data, max_epochs=2)
    assert seen == {"epoch": 0, "equal": True}
    assert trainer.state.iteration == 2


def test_resume_from_corrupt_checkpoint_raises_clear_error(tmp_path):
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"garbage")
    net = _net(0)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), None)
    ResumeFromLatest(tmp_path, {"network": net}).attach(trainer)
    with pytest.raises(ValueError, match="unreadable"):
        trainer.run([torch.rand(2, 3)], max_epochs=1)


# ---------------------------------------------------------------- memory estimate


def test_memory_estimate_matches_the_measured_peaks():
    """The constants reproduce the peaks that benchmarks/memory_peak.py measured (its committed CSV, without refinement,
    with it on the network grid and on the native grid) within 12 %, and a 512x512x400 pair needs far more than a 16 GB laptop has."""
    import csv

    with open(Path(__file__).resolve().parents[1] / "docs" / "results" / "memory_peak_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 3
    for row in rows:
        voxels = float(np.prod([int(n) for n in row["shape"].split("x")]))
        refine, native = row["refine"] == "True", row["native_refinement"] == "True"
        estimate = estimate_memory_bytes(2 * voxels, voxels / float(row["pixdim_mm"]) ** 3, refinement=refine,
                                         native_refined_voxels=voxels if native else 0.0) / 2**30
        assert estimate == pytest.approx(float(row["estimate_gib"]), abs=0.002)  # the CSV's estimate is this one
        assert abs(estimate - float(row["peak_gib"])) / float(row["peak_gib"]) < 0.12, row
        if refine or native:  # the refinements' constants are the largest excess measured: never under these peaks
            assert estimate >= float(row["peak_gib"]), row
    assert sum(row["refine"] == "True" for row in rows) >= 3
    assert sum(row["native_refinement"] == "True" for row in rows) >= 3
    assert estimate_memory_bytes(2 * 512 * 512 * 400, 512 * 512 * 400 / 64) / 2**30 > 12


def test_memory_check_refuses_with_options_that_fit_and_can_be_disabled():
    image = _meta(torch.rand(1, 64, 64, 64), "f.nii.gz")  # identity affine: 1 mm voxels
    item = {"moving": _meta(torch.rand(1, 64, 64, 64), "m.nii.gz"), "fixed": image}
    need = estimate_memory_bytes(2 * 64**3, 64**3)  # 1 mm network grid
    assert CheckMemoryd(["moving", "fixed"], pixdim=[1, 1, 1], available=need * 1.01)(item)["fixed"] is image
    coarse = estimate_memory_bytes(2 * 64**3, 64**3 / 8)
    with pytest.raises(MemoryError) as error:
        CheckMemoryd(["moving", "fixed"], pixdim=[1, 1, 1], available=(need + coarse) / 2)(item)
    message = str(error.value)
    assert "m.nii.gz" in message and "f.nii.gz" in message and "GiB" in message
    assert "--pixdim [2.0, 2.0, 2.0]" in message and "memory_check False" in message
    with pytest.raises(MemoryError, match="resampled to voxels") as error:  # not even a coarser grid fits
        CheckMemoryd(["moving", "fixed"], pixdim=[1, 1, 1], available=coarse * 0.99)(item)
    assert "--pixdim" not in str(error.value)
    from bundle.errors import input_error

    wrapped = RuntimeError("applying transform")  # as MONAI's Compose wraps it: still reported as the input error
    wrapped.__cause__ = error.value
    assert input_error(wrapped) is error.value
    assert CheckMemoryd(["moving", "fixed"], pixdim=[1, 1, 1], enabled=False, available=1.0)(item)["fixed"] is image


def test_memory_check_counts_the_refinement():
    item = {"moving": _meta(torch.rand(1, 64, 64, 64), "m.nii.gz"), "fixed": _meta(torch.rand(1, 64, 64, 64), "f.nii.gz")}
    forward, refined = estimate_memory_bytes(2 * 64**3, 64**3), estimate_memory_bytes(2 * 64**3, 64**3, refinement=True)
    assert refined > forward
    between = (forward + refined) / 2
    CheckMemoryd(["moving", "fixed"], pixdim=[1, 1, 1], available=between)(item)  # the forward pass fits
    with pytest.raises(MemoryError, match="no refinement"):
        CheckMemoryd(["moving", "fixed"], pixdim=[1, 1, 1], available=between, refinement=True)(item)


def test_write_csv_writes_rows_in_column_order_and_leaves_no_temporary_file(tmp_path):
    writers.write_csv(tmp_path / "r.csv", [{"b": 1, "a": 2.5}, {"b": 3, "a": "x"}])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["b,a", "1,2.5", "3,x"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


@pytest.mark.parametrize("parallel", [True, False])
def test_one_loader_shared_by_threads_keeps_every_channel(tmp_path, parallel):
    """CacheDataset's threads share one LoadImaged: MONAI's reader keeps the file names of a read for its get_data, so
    without our lock a 2-file (2-channel) image read beside a 1-file mask came back with 1 channel; with its keys
    read at the same time (``parallel``) as well."""
    import threading

    for name in ("t1c", "flair", "mask"):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((6, 6, 6), dtype=np.float32), np.eye(4)),
                 str(tmp_path / f"{name}.nii.gz"))
    load = LoadImaged(["image", "mask"], ensure_channel_first=True, parallel=parallel)
    item = {"image": [str(tmp_path / "t1c.nii.gz"), str(tmp_path / "flair.nii.gz")], "mask": str(tmp_path / "mask.nii.gz")}
    shapes = []

    def work():
        for _ in range(100):
            out = load(dict(item))
            shapes.append((out["image"].shape[0], out["mask"].shape[0]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(shapes) == 400 and set(shapes) == {(2, 1)}, sorted(set(shapes))


@pytest.mark.parametrize("image_only", [True, False])
def test_keys_read_at_the_same_time_give_what_one_after_another_gives(tmp_path, image_only):
    rng = np.random.default_rng(1)
    item = {}
    for key, shape in (("moving", (5, 6, 7)), ("fixed", (7, 6, 5)), ("moving_label", (5, 6, 7))):
        affine = np.diag([1.0, 2.0, 3.0, 1.0])
        nib.save(nib.Nifti1Image(rng.random(shape, dtype=np.float32), affine), str(tmp_path / f"{key}.nii.gz"))
        item[key] = str(tmp_path / f"{key}.nii.gz")
    keys = ["moving", "fixed", "moving_label", "absent"]
    together = LoadImaged(keys, image_only=image_only, allow_missing_keys=True)(item)
    apart = LoadImaged(keys, image_only=image_only, allow_missing_keys=True, parallel=False)(item)
    assert list(together) == list(apart) and "absent" not in together
    for key in ("moving", "fixed", "moving_label"):
        assert torch.equal(together[key], apart[key]) and together[key].meta["filename_or_obj"] == item[key]
        np.testing.assert_array_equal(together[key].affine, apart[key].affine)
        if not image_only:
            assert together[f"{key}_meta_dict"]["filename_or_obj"] == item[key]
    (tmp_path / "fixed.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"fixed.nii.gz: not a readable image"):
        LoadImaged(keys, allow_missing_keys=True)(item)


def test_a_complex_image_is_refused_whichever_key_finishes_first(tmp_path):
    """Complex data read beside a real image in parallel threads: refused every time (a ComplexWarning turned into an
    error was process-wide and undone by the other thread's read: the fuzz campaign found one accepted)."""
    rng = np.random.default_rng(2)
    real = rng.random((9, 8, 7)).astype(np.float64)
    nib.save(nib.Nifti1Image(real, np.eye(4)), str(tmp_path / "real.nii.gz"))
    nib.save(nib.Nifti1Image((real + 1j * real).astype(np.complex64), np.eye(4)), str(tmp_path / "complex.nii.gz"))
    for image_only in (True, False):
        load = LoadImaged(["moving", "fixed"], image_only=image_only)
        for _ in range(40):
            with pytest.raises(ValueError, match=r"complex.nii.gz: complex-valued image"):
                load({"moving": str(tmp_path / "real.nii.gz"), "fixed": str(tmp_path / "complex.nii.gz")})
        out = load({"moving": str(tmp_path / "real.nii.gz"), "fixed": str(tmp_path / "real.nii.gz")})
        assert out["moving"].dtype == torch.float32 and isinstance(out["moving"], MetaTensor)
        np.testing.assert_allclose(out["fixed"].numpy(), real.astype(np.float32))
        if not image_only:
            assert out["fixed_meta_dict"]["filename_or_obj"] == str(tmp_path / "real.nii.gz")
    kept = LoadImaged(["moving"], dtype=None)({"moving": str(tmp_path / "real.nii.gz")})
    assert kept["moving"].dtype == torch.float64


def test_output_files_name_what_was_asked_for_and_refuse_unknown_outputs():
    from bundle.io import OUTPUTS, output_files

    assert output_files() == {"warped": "warped.nii.gz", "pred": "ddf.nii.gz", "jacobian_det": "jacobian_det.nii.gz",
                              "warped_label": "warped_label.nii.gz", "seg_moving": "seg_moving.nii.gz",
                              "seg_fixed": "seg_fixed.nii.gz"}
    assert output_files(["ddf", "warped"], ".nii") == {"warped": "warped.nii", "pred": "ddf.nii"}
    assert output_files("jacobian") == {"jacobian_det": "jacobian_det.nii.gz"}
    for bad, message in ((["warped", "wraped"], "outputs must be"), ([], "outputs must be")):
        with pytest.raises(ValueError, match=message):
            output_files(bad)
    with pytest.raises(ValueError, match="output_extension"):
        output_files(["ddf"], ".mha")
    assert set(OUTPUTS) == {"warped", "ddf", "jacobian", "labels", "segmentations"}


@pytest.mark.parametrize("shape, vector, dtype", [((3, 7, 5, 4), True, "float32"), ((1, 7, 5, 4), False, "float32"),
                                                  ((2, 7, 5), True, "float32"), ((1, 7, 5, 4), False, "int16"),
                                                  ((4, 7, 5, 3), False, "float32"), ((1, 6, 5, 4), False, "uint32")])
def test_write_nifti_lays_out_channels_last_with_x_fastest(tmp_path, shape, vector, dtype):
    """The written voxels are the channel-first array moved to NIfTI's layout (vector fields as (*spatial, 1, C)),
    whatever the dtype (one torch cannot hold takes numpy's path)."""
    import nibabel as nib

    from bundle.io.writers import write_nifti

    array = (np.random.default_rng(0).random(shape) * 100).astype(dtype)
    write_nifti(array, np.eye(4), tmp_path / "x.nii", vector=vector)
    got = np.asanyarray(nib.load(tmp_path / "x.nii").dataobj)
    spatial = shape[1:]
    if vector:
        expected = np.moveaxis(array, 0, -1).reshape(*spatial, *([1] * (3 - len(spatial))), 1, shape[0])
    else:
        expected = array[0] if shape[0] == 1 else np.moveaxis(array, 0, -1)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_memory_check_counts_the_native_refinement():
    item = {"moving": _meta(torch.rand(1, 64, 64, 64), "m.nii.gz"), "fixed": _meta(torch.rand(1, 64, 64, 64), "f.nii.gz")}
    forward = estimate_memory_bytes(2 * 64**3, 64**3 / 8)
    native = estimate_memory_bytes(2 * 64**3, 64**3 / 8, native_refined_voxels=64**3)
    assert native - forward == pytest.approx(MEMORY_BYTES_PER_NATIVE_REFINED_VOXEL * 64**3) and native > forward
    between = (forward + native) / 2
    CheckMemoryd(["moving", "fixed"], pixdim=[2, 2, 2], available=between)(item)  # without it the pair fits
    with pytest.raises(MemoryError, match="native_refinement_levels"):
        CheckMemoryd(["moving", "fixed"], pixdim=[2, 2, 2], available=between, native_refinement=True)(item)
