"""The tumour ablation benchmark (benchmarks/tumour_ablation.py): data preparation (normalisation, crop, datalist),
per-pair region scoring from the bundle's inference outputs, and the CSV / Markdown tables; tiny synthetic cases
with known answers, plus the preparation of one real BraTS 2013 case (skipped without ``../shared/data``).
Data: BraTS 2013 (Menze et al. 2015), CC BY-NC-SA 3.0."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, SHARED_DATA

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import tumour_ablation  # noqa: E402
from bundle.io.writers import write_nifti  # noqa: E402

SHAPE = (20, 18, 16)
# SRI24-like storage (x and y flipped): the crop must move the origin along the flipped axes correctly
AFFINE = np.array([[-1.0, 0, 0, 100.0], [0, -1.0, 0, 120.0], [0, 0, 1.0, -50.0], [0, 0, 0, 1]])
# brain-mask boxes: their union spans x0 5..14, x1 6..12, x2 3..12, so the crop (4 voxels before, 4 after) is
# x0 1..18, x1 2..16 and x2 0..15 (clipped at both ends of the grid)
BOXES = {
    "brats_2013_pat0003_1": np.s_[5:12, 6:13, 3:11],
    "brats_2013_pat0005_1": np.s_[8:15, 6:13, 4:13],
}
LO, HI = np.array([1, 2, 0]), np.array([19, 17, 16])


def _all_cases() -> list[str]:
    return [c for split in tumour_ablation.SPLIT.values() for c in split]


def _save(array, path: Path, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), AFFINE), str(path))


def _fake_sources(root: Path) -> dict[str, np.ndarray]:
    """Every case of the split, in the BraTS 2013 and TCGA layouts; returns each case's brain mask.

    Inside its mask a case's T1c takes the values ``arange(n) - (n - 1) / 2`` (z-scored-like, so the background 0
    is the median brain value) and its FLAIR their negatives; the tumour labels are BraTS classes 1, 2 and 4."""
    masks = {}
    for k, case in enumerate(_all_cases()):
        mask = np.zeros(SHAPE, bool)
        mask[BOXES.get(case, np.s_[7:12, 7:12, 5:9])] = True
        n = int(mask.sum())
        values = np.random.default_rng(k).permutation(n) - (n - 1) / 2
        t1c = np.zeros(SHAPE)
        t1c[mask] = values
        tumour = np.zeros(SHAPE)
        tumour[9, 8, 6], tumour[9, 9, 6], tumour[10, 9, 7] = 1, 2, 4
        if case.startswith("TCGA"):
            folder = root / "tcga_brats" / case
            files = {"t1c": "t1c.nii.gz", "flair": "flair.nii.gz", "mask": "brain_mask.nii.gz",
                     "tumour": "auto_segmentations/fusion_simple.nii.gz"}
        else:
            folder = root / "brats2013" / ("test" if case in tumour_ablation.SPLIT["test"] else "train") / case
            files = {"t1c": "T1c_subtrMeanDivStd.nii.gz", "flair": "Flair_subtrMeanDivStd.nii.gz",
                     "mask": "brainmask.nii.gz", "tumour": "OTMultiClass.nii.gz"}
        for key, array, dtype in (("t1c", t1c, np.float32), ("flair", -t1c, np.float32), ("mask", mask, np.int32),
                                  ("tumour", tumour, np.uint8)):
            _save(array, folder / files[key], dtype)
        masks[case] = mask
    return masks


def test_sources_find_both_layouts(tmp_path):
    _fake_sources(tmp_path)
    sources = tumour_ablation._sources(tmp_path)
    assert sorted(sources) == sorted(_all_cases())
    assert all(p.is_file() for paths in sources.values() for p in paths.values())
    tcga = sources["TCGA-DU-7294"]
    assert tcga["tumour"] == tmp_path / "tcga_brats" / "TCGA-DU-7294" / "auto_segmentations" / "fusion_simple.nii.gz"
    assert sources["brats_2013_pat0001_1"]["mask"].name == "brainmask.nii.gz"


def test_prepare_normalises_inside_the_mask_and_crops_to_the_union_of_brains(tmp_path):
    """Intensities: ``(v - p0.5) / (p99.5 - p0.5)`` of the brain voxels, clipped to [0, 1], background 0 (although
    the raw background is the median brain value); tumour = any label > 0; every case cropped to the box around all
    brain masks (4 voxels margin, clipped to the grid) with the origin moved so world positions are kept."""
    masks = _fake_sources(tmp_path / "data_root")
    work = tmp_path / "work"
    tumour_ablation.prepare(tmp_path / "data_root", work)
    case = "brats_2013_pat0005_1"
    t1c = nib.load(str(work / "data" / case / "t1c.nii.gz"))
    assert t1c.shape == tuple(HI - LO)
    expected_affine = AFFINE.copy()
    expected_affine[:3, 3] = AFFINE[:3, :3] @ LO + AFFINE[:3, 3]
    np.testing.assert_allclose(t1c.affine, expected_affine)
    crop = tuple(slice(a, b) for a, b in zip(LO, HI))
    mask = masks[case][crop]
    raw = np.asarray(nib.load(str(tmp_path / "data_root" / "brats2013" / "train" / case / "T1c_subtrMeanDivStd.nii.gz")
                                 ).dataobj)[crop]
    n = int(masks[case].sum())  # raw brain values: -(n-1)/2 .. (n-1)/2, so p0.5 = -0.495 (n-1), p99.5 = 0.495 (n-1)
    expected = np.where(mask, np.clip((raw + 0.495 * (n - 1)) / (0.99 * (n - 1)), 0, 1), 0)
    data = np.asarray(t1c.dataobj)
    np.testing.assert_allclose(data, expected, atol=1e-6)
    assert data[mask & (raw == 0)] == pytest.approx(0.5, abs=1e-6) and np.all(data[~mask] == 0)
    flair = np.asarray(nib.load(str(work / "data" / case / "flair.nii.gz")).dataobj)
    np.testing.assert_allclose(flair, np.where(mask, 1 - expected, 0), atol=1e-6)  # FLAIR = -T1c: mirrored scale
    tumour = np.asarray(nib.load(str(work / "data" / case / "tumour.nii.gz")).dataobj)
    assert tumour.dtype == np.uint8 and set(np.unique(tumour).tolist()) == {0, 1}
    assert [tuple(p + LO) for p in np.argwhere(tumour)] == [(9, 8, 6), (9, 9, 6), (10, 9, 7)]  # same world voxels
    tcga = np.asarray(nib.load(str(work / "data" / "TCGA-FG-6692" / "tumour.nii.gz")).dataobj)
    np.testing.assert_array_equal(tcga, tumour)


def test_prepare_writes_the_split_datalist_and_refuses_missing_cases(tmp_path):
    """Training pairs only among training subjects; validation = the validation subject with each training one,
    both ways; testing = every ordered pair with a test subject on either side (8 x 7 - 6 x 5 = 26)."""
    _fake_sources(tmp_path / "data_root")
    path = tumour_ablation.prepare(tmp_path / "data_root", tmp_path / "work")
    datalist = json.loads(path.read_text())
    split = tumour_ablation.SPLIT
    names = {k: [p["name"] for p in v] for k, v in datalist.items()}
    assert names["training"] == [f"{m}_to_{f}" for m, f in permutations(split["train"], 2)]
    assert len(names["training"]) == 20
    val = split["validation"][0]
    both_ways = [f"{val}_to_{t}" for t in split["train"]] + [f"{t}_to_{val}" for t in split["train"]]
    assert sorted(names["validation"]) == sorted(both_ways)
    assert len(names["testing"]) == 26 and len(set(names["testing"])) == 26
    assert all(p["moving"][0].split("/")[1] in split["test"] or p["fixed"][0].split("/")[1] in split["test"]
               for p in datalist["testing"])
    assert not {n for n in names["training"] + names["validation"] for t in split["test"] if t in n}  # no test leak
    first = datalist["training"][0]
    m, f = split["train"][:2]
    assert first == {"moving": [f"data/{m}/t1c.nii.gz", f"data/{m}/flair.nii.gz"],
                     "fixed": [f"data/{f}/t1c.nii.gz", f"data/{f}/flair.nii.gz"],
                     "moving_tumour": f"data/{m}/tumour.nii.gz", "fixed_tumour": f"data/{f}/tumour.nii.gz",
                     "moving_label": f"data/{m}/tumour.nii.gz", "name": f"{m}_to_{f}"}
    assert all((tmp_path / "work" / p).is_file() for pair in datalist["testing"] for p in pair["moving"] + pair["fixed"])
    shutil.rmtree(tmp_path / "data_root" / "tcga_brats" / "TCGA-DU-7294")
    with pytest.raises(FileNotFoundError, match="TCGA-DU-7294"):
        tumour_ablation.prepare(tmp_path / "data_root", tmp_path / "work2")


# ------------------------------------------------------------------------------------------------ scoring

GRID = (12, 10, 10)
GRID_AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm along x0: band of 10 mm = 5 voxels


def _scoring_case(tmp_path: Path, shifted_outside_slab: int = 7):
    """Fixed and moving 2-channel cases on one grid. Fixed tumour: slab x0 = 0; moving tumour: slab x0 = 1; so the
    tumour region (their union) is x0 in {0, 1}, the 10 mm band x0 = 2..6 and the rest x0 = 7..11. The moving T1c is
    the fixed one + 0.4 on x0 in {0, 1} and + 0.2 on the slab x0 = ``shifted_outside_slab``; FLAIR identical."""
    rng = np.random.default_rng(0)
    fixed = rng.random((2, *GRID)).astype(np.float32)
    moving = fixed.copy()
    moving[0, :2] += 0.4
    moving[0, shifted_outside_slab] += 0.2
    fixed_tumour, moving_tumour = np.zeros((1, *GRID), np.uint8), np.zeros((1, *GRID), np.uint8)
    fixed_tumour[0, 0], moving_tumour[0, 1] = 1, 1
    for case, image, tumour in (("F", fixed, fixed_tumour), ("M", moving, moving_tumour)):
        for c, seq in enumerate(("t1c", "flair")):
            write_nifti(image[c : c + 1], GRID_AFFINE, tmp_path / "data" / case / f"{seq}.nii.gz")
        write_nifti(tumour, GRID_AFFINE, tmp_path / "data" / case / "tumour.nii.gz")
    pair = {"moving": ["data/M/t1c.nii.gz", "data/M/flair.nii.gz"], "fixed": ["data/F/t1c.nii.gz", "data/F/flair.nii.gz"],
            "moving_tumour": "data/M/tumour.nii.gz", "fixed_tumour": "data/F/tumour.nii.gz",
            "moving_label": "data/M/tumour.nii.gz", "name": "M_to_F"}
    return pair, fixed, fixed_tumour, moving_tumour


def test_identity_score_uses_both_tumours_and_the_header_spacing(tmp_path):
    """No registration: the moving image as it is. Channel-mean squared error 0.4^2 / 2 in the tumour union, none in
    the band; the x0 = 7 slab (14 mm from the tumour at 2 mm voxels, so outside) carries 0.2^2 / 2 over 5 slabs."""
    pair, *_ = _scoring_case(tmp_path)
    row = tumour_ablation._score(tmp_path, pair, None, band_mm=10.0)
    assert row["pair"] == "M_to_F" and "tumour_dice_fixed" not in row
    assert row["mse_tumour"] == pytest.approx(0.08, rel=1e-4)
    assert row["mse_band"] == pytest.approx(0.0, abs=1e-10)  # x0 = 1 belongs to the tumour, not the band
    assert row["mse_outside"] == pytest.approx(0.02 / 5, rel=1e-4)
    assert row["folding_pct_tumour"] == row["folding_pct_band"] == row["folding_pct_outside"] == 0.0
    # a narrower band moves the x0 = 3..6 slabs (>= 6 mm) outside: that error is now shared among 9 slabs
    narrow = tumour_ablation._score(tmp_path, pair, None, band_mm=2.0)
    assert narrow["mse_outside"] == pytest.approx(0.02 / 9, rel=1e-4)


def test_score_reads_the_bundle_outputs(tmp_path, monkeypatch):
    """Outputs written as the inference config writes them (``SaveNiftid`` / ``write_nifti``): a 2-channel warped
    image equal to the fixed one, a DDF folding half of the grid (x0 -> -x0 for x1 < 5, det J = -1 there), the warped
    moving tumour and both segmentations; a segmentation is scored only on a held-out (test) subject's image."""
    monkeypatch.setitem(tumour_ablation.SPLIT, "test", ["M", "F"])
    pair, fixed, fixed_tumour, moving_tumour = _scoring_case(tmp_path)
    out = tmp_path / "variant" / "test_outputs" / pair["name"]
    x0 = np.arange(GRID[0], dtype=np.float32)[:, None, None] * np.ones(GRID, np.float32)
    ddf = np.zeros((3, *GRID), np.float32)
    ddf[0, :, :5] = -2.0 * x0[:, :5]
    seg_fixed = fixed_tumour.copy()
    seg_fixed[0, 1] = 1  # two slabs predicted, one true: Dice 2 * 1 / (2 + 1)
    write_nifti(fixed, GRID_AFFINE, out / "warped.nii.gz")
    write_nifti(ddf, GRID_AFFINE, out / "ddf.nii.gz", vector=True)
    write_nifti(moving_tumour.astype(np.int16), GRID_AFFINE, out / "warped_label.nii.gz")
    write_nifti(moving_tumour, GRID_AFFINE, out / "seg_moving.nii.gz")
    write_nifti(seg_fixed, GRID_AFFINE, out / "seg_fixed.nii.gz")
    row = tumour_ablation._score(tmp_path, pair, out, band_mm=10.0)
    for region in ("tumour", "band", "outside"):
        assert row[f"mse_{region}"] == pytest.approx(0.0, abs=1e-12)
        assert row[f"ncc_{region}"] == pytest.approx(1.0, abs=1e-4)
        assert row[f"folding_pct_{region}"] == pytest.approx(50.0)
    assert row["tumour_dice_moving"] == 1.0 and row["tumour_dice_fixed"] == pytest.approx(2 / 3)
    monkeypatch.setitem(tumour_ablation.SPLIT, "test", ["F"])  # the moving subject trained the model: not scored
    row = tumour_ablation._score(tmp_path, pair, out, band_mm=10.0)
    assert "tumour_dice_moving" not in row and row["tumour_dice_fixed"] == pytest.approx(2 / 3)


def test_tables_are_per_variant_means_ignoring_missing_values(tmp_path):
    """CSV: every row with the union of the keys; Markdown: per-variant NaN-ignoring means, 4 decimals."""
    rows = [
        {"variant": "identity", "pair": "a_to_b", "ncc_tumour": 0.5, "mse_tumour": 0.2},
        {"variant": "identity", "pair": "b_to_a", "ncc_tumour": 0.7, "mse_tumour": float("nan")},
        {"variant": "masked_subtract", "pair": "a_to_b", "ncc_tumour": 0.9, "mse_tumour": 0.1, "tumour_dice_fixed": 0.8},
        {"variant": "masked_subtract", "pair": "b_to_a", "ncc_tumour": 0.8, "mse_tumour": 0.3, "tumour_dice_fixed": 0.6},
    ]
    import warnings

    with warnings.catch_warnings():  # identity has no segmentation Dice: "nan", without numpy's empty-mean warning
        warnings.simplefilter("error")
        tumour_ablation._write_tables(rows, tmp_path)
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left
    assert (tmp_path / "tumour_ablation.md").read_text().splitlines() == [
        "| variant | ncc_tumour | mse_tumour | tumour_dice_fixed |",
        "|---|---|---|---|",
        "| identity | 0.6000 | 0.2000 | nan |",
        "| masked_subtract | 0.8500 | 0.2000 | 0.7000 |",
    ]
    with open(tmp_path / "tumour_ablation.csv") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["variant", "pair", "ncc_tumour", "mse_tumour", "tumour_dice_fixed"]
    assert [r["tumour_dice_fixed"] for r in written] == ["", "", "0.8", "0.6"]
    assert float(written[3]["mse_tumour"]) == 0.3


def test_common_overrides_and_dice():
    common = tumour_ablation._common(Path("/w"), "unmasked_concat")
    assert common == {"bundle_root": Path("/w/unmasked_concat"), "datalist": Path("/w/datalist.json"),
                      "num_channels": 2, "pixdim": "[4.0,4.0,4.0]", "merge": "concat", "progress_bar": False}
    assert {(v["mask_source"], v["merge"]) for v in tumour_ablation.VARIANTS.values()} == {
        ("label", "subtract"), ("none", "subtract"), ("label", "concat"), ("none", "concat")}
    a, b = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 1], bool)
    assert tumour_ablation._dice(a, b) == pytest.approx(2 * 1 / 5)
    assert np.isnan(tumour_ablation._dice(np.zeros(4, bool), np.zeros(4, bool)))  # both empty: no score, not 1


REAL_CASE = SHARED_DATA / "brats2013" / "test" / "brats_2013_pat0001_1"


@pytest.mark.skipif(not (REAL_CASE / "OTMultiClass.nii.gz").is_file(), reason="../shared/data/brats2013 absent")
def test_prepare_one_real_brats_case(tmp_path, monkeypatch):
    """One real case alone (its own split): brain intensities in [0, 1] with about 0.5 % of the brain voxels clipped
    at each end, zero outside the brain mask, the crop = the mask's box with the 4-voxel margin, and every tumour
    voxel kept at the same world position."""
    root = tmp_path / "data_root" / "brats2013" / "test"
    root.mkdir(parents=True)
    (root / REAL_CASE.name).symlink_to(REAL_CASE)
    monkeypatch.setattr(tumour_ablation, "SPLIT", {"train": [REAL_CASE.name], "validation": [REAL_CASE.name], "test": []})
    tumour_ablation.prepare(tmp_path / "data_root", tmp_path / "work")
    mask_image = nib.load(str(REAL_CASE / "brainmask.nii.gz"))
    mask = np.asarray(mask_image.dataobj) > 0
    lo = np.maximum(np.argwhere(mask).min(0) - 4, 0)
    hi = np.minimum(np.argwhere(mask).max(0) + 5, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = tmp_path / "work" / "data" / REAL_CASE.name
    t1c = nib.load(str(out / "t1c.nii.gz"))
    data, brain = np.asarray(t1c.dataobj), mask[crop]
    assert data.shape == tuple(hi - lo) and data.dtype == np.float32
    assert np.all(data[~brain] == 0) and data.min() == 0.0 and data.max() == 1.0
    assert np.mean(data[brain] == 1.0) == pytest.approx(0.005, abs=0.0015)
    assert np.mean(data[brain] == 0.0) == pytest.approx(0.005, abs=0.0015)
    assert 0.2 < np.median(data[brain]) < 0.8
    np.testing.assert_allclose(t1c.affine @ [0, 0, 0, 1], mask_image.affine @ [*lo, 1], atol=1e-4)
    raw_tumour = np.asarray(nib.load(str(REAL_CASE / "OTMultiClass.nii.gz")).dataobj) > 0
    tumour = np.asarray(nib.load(str(out / "tumour.nii.gz")).dataobj)
    assert tumour.sum() == raw_tumour.sum() > 1000  # nothing of the tumour cropped away
    np.testing.assert_array_equal(tumour, raw_tumour[crop])
