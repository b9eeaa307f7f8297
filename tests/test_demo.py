"""Tests of the embedded demo data set built from the MNI ICBM152 template shipped with nilearn."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from bundle.data import demo
from bundle.data.demo import build_demo_dataset

try:
    demo.template_paths()
    HAS_TEMPLATE = True
except FileNotFoundError:
    HAS_TEMPLATE = False

pytestmark = pytest.mark.skipif(not HAS_TEMPLATE, reason="nilearn (and its MNI ICBM152 template) is not installed")

NUM_SUBJECTS = 6
SPACING = 4.0
KEYS = ("moving", "fixed", "moving_label", "fixed_label")


def _build(path, **kwargs):
    args = {"num_subjects": NUM_SUBJECTS, "spacing": SPACING, "seed": 0}
    args.update(kwargs)
    return build_demo_dataset(str(path), **args)


def _load_all(folder):
    images = [nib.load(os.path.join(folder, f"subject_{i:02d}.nii.gz")) for i in range(NUM_SUBJECTS)]
    labels = [nib.load(os.path.join(folder, f"subject_{i:02d}_seg.nii.gz")) for i in range(NUM_SUBJECTS)]
    return images, labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    return _build(folder)


def test_datalist_structure(dataset):
    folder = os.path.dirname(dataset)
    assert os.path.basename(dataset) == "datalist.json"
    with open(dataset) as f:
        datalist = json.load(f)
    assert set(datalist) == {"training", "validation", "testing"}
    n_train = NUM_SUBJECTS - 4
    assert len(datalist["training"]) == n_train * (n_train - 1)
    assert len(datalist["validation"]) == len(datalist["testing"]) == 4

    def subjects(section):
        return {item[k][:10] for item in datalist[section] for k in ("moving", "fixed")}

    # training, validation and test subjects are three disjoint sets: the test pairs were never used for selection
    assert not subjects("training") & subjects("validation")
    assert not subjects("training") & subjects("testing")
    assert not subjects("validation") & subjects("testing")
    assert {(x["moving"], x["fixed"]) for x in datalist["validation"]} == {
        ("subject_02_lesion.nii.gz", "subject_03.nii.gz"),
        ("subject_03_lesion.nii.gz", "subject_02.nii.gz"),
        ("subject_02.nii.gz", "subject_03.nii.gz"),
        ("subject_03.nii.gz", "subject_02.nii.gz"),
    }
    assert {(x["moving"], x["fixed"]) for x in datalist["testing"]} == {
        ("subject_04_lesion.nii.gz", "subject_05.nii.gz"),
        ("subject_05_lesion.nii.gz", "subject_04.nii.gz"),
        ("subject_04.nii.gz", "subject_05.nii.gz"),
        ("subject_05.nii.gz", "subject_04.nii.gz"),
    }
    for item in datalist["training"]:
        assert "moving_tumour" not in item and "fixed_tumour" not in item
    for item in datalist["training"] + datalist["validation"] + datalist["testing"]:
        assert item["moving"] != item["fixed"]
        assert item["moving_label"] == item["moving"].replace(".nii.gz", "_seg.nii.gz")
        assert item["fixed_label"] == item["fixed"].replace(".nii.gz", "_seg.nii.gz")
        lesion = "lesion" if "lesion" in item["moving"] else ""
        assert item["name"] == f"s{item['moving'][8:10]}{lesion}_to_s{item['fixed'][8:10]}"
        for key in [k for k in ("moving", "fixed", "moving_label", "fixed_label", "moving_tumour", "fixed_tumour") if k in item]:
            assert not os.path.isabs(item[key])
            assert os.path.isfile(os.path.join(folder, item[key]))
    for item in datalist["validation"] + datalist["testing"]:
        assert item["moving_tumour"] == item["moving"].replace(".nii.gz", "_tumour.nii.gz")
        assert item["fixed_tumour"] == item["fixed"].replace(".nii.gz", "_tumour.nii.gz")
        moving_tumour = nib.load(os.path.join(folder, item["moving_tumour"])).get_fdata()
        fixed_tumour = nib.load(os.path.join(folder, item["fixed_tumour"])).get_fdata()
        assert (moving_tumour.sum() > 0) == ("lesion" in item["moving"]), "only the lesion versions have a tumour"
        assert fixed_tumour.sum() == 0
        assert set(np.unique(moving_tumour)) <= {0.0, 1.0}

def test_volumes(dataset):
    images, labels = _load_all(os.path.dirname(dataset))
    shape = images[0].shape
    assert len(shape) == 3 and all(s % 16 == 0 for s in shape)
    for img, seg in zip(images, labels):
        assert img.shape == shape and seg.shape == shape
        np.testing.assert_allclose(img.header.get_zooms(), (SPACING,) * 3)
        np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), (SPACING,) * 3)
        np.testing.assert_allclose(img.affine, seg.affine)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = img.get_fdata()
        assert np.isfinite(data).all()
        assert data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0.5
        assert seg.get_data_dtype() == np.uint8
        values = np.asarray(seg.dataobj)
        assert set(np.unique(values)) == {0, 1, 2}
        assert (data[values > 0] > 0).all()


def test_subjects_differ(dataset):
    images, labels = _load_all(os.path.dirname(dataset))
    arrays = [img.get_fdata() for img in images]
    segs = [np.asarray(seg.dataobj) for seg in labels]
    for i in range(NUM_SUBJECTS):
        for j in range(i + 1, NUM_SUBJECTS):
            assert np.abs(arrays[i] - arrays[j]).mean() > 0.01
            assert (segs[i] != segs[j]).mean() > 0.01


def test_deterministic_and_reused(dataset, tmp_path):
    first, _ = _load_all(os.path.dirname(dataset))
    other = _build(tmp_path)
    second, second_labels = _load_all(tmp_path)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())

    mtime = os.path.getmtime(tmp_path / "subject_00.nii.gz")
    assert _build(tmp_path) == other
    assert os.path.getmtime(tmp_path / "subject_00.nii.gz") == mtime
    with open(tmp_path / "demo_params.json") as f:
        assert json.load(f)["seed"] == 0

    _build(tmp_path, seed=1)
    reseeded, _ = _load_all(tmp_path)
    assert not np.array_equal(reseeded[0].get_fdata(), second[0].get_fdata())
    with open(tmp_path / "demo_params.json") as f:
        assert json.load(f)["seed"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_demo_dataset(str(tmp_path), num_subjects=5)
    with pytest.raises(ValueError):
        build_demo_dataset(str(tmp_path), spacing=0)


def test_missing_template(tmp_path, monkeypatch):
    monkeypatch.setitem(demo._TEMPLATE_FILES, "t1", "no_such_template.nii.gz")
    with pytest.raises(FileNotFoundError, match="pip install nilearn"):
        build_demo_dataset(str(tmp_path / "missing"))
