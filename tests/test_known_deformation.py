"""Known-deformation pairs (bundle/data/known_deformation.py), the endpoint error by region, the consistency mask and
the benchmark (benchmarks/known_deformation.py): small synthetic volumes with known answers, and the make -> run ->
report chain on a fake data folder with a randomly initialised joint model."""

from __future__ import annotations

import csv
import json
import math
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import known_deformation as benchmark  # noqa: E402

from bundle.configs import read_config  # noqa: E402
from bundle.data import load_split  # noqa: E402
from bundle.data.known_deformation import known_deformation_pair, mass_effect_ddf  # noqa: E402
from bundle.io.writers import write_nifti  # noqa: E402
from bundle.losses import consistency_mask  # noqa: E402
from bundle.metrics import endpoint_error_by_region, jacobian_determinant, tumour_regions  # noqa: E402
from bundle.spatial import index_grid, sample_field  # noqa: E402

torch.set_num_threads(1)

SHAPE = (32, 32, 32)
SPACING = (2.0, 2.0, 2.0)


def _case(shape=SHAPE, seed=0):
    """A 2-channel 'brain' (ball of radius 13 voxels, textured, 0 outside) with a bright spherical tumour of radius 4."""
    grid = index_grid(shape)
    centre = torch.tensor(shape, dtype=torch.float32).view(3, 1, 1, 1) / 2 - 0.5
    brain = ((grid - centre) ** 2).sum(0).sqrt() < 13
    rng = np.random.default_rng(seed)
    texture = torch.as_tensor(rng.uniform(0.0, 0.1, size=(2, *shape)), dtype=torch.float32)
    image = (torch.stack([0.35 + 0.15 * torch.sin(grid[0] / 3), 0.45 + 0.15 * torch.cos(grid[2] / 4)]) + texture) * brain
    tumour = ((grid - torch.tensor([18.0, 15.0, 14.0]).view(3, 1, 1, 1)) ** 2).sum(0).sqrt() < 4
    image[:, tumour] = 0.9
    return image, tumour[None], brain[None]


def _warp(values, ddf):
    """``values(x + ddf(x))`` through the bundle's grid sampler (not the warp the pair is built with)."""
    return sample_field(values.float(), index_grid(values.shape[1:]) + ddf, padding_mode="zeros")


@pytest.mark.parametrize("change", ["growth", "resection"])
def test_the_true_ddf_registers_the_pair_outside_the_changed_region(change):
    image, tumour, _ = _case()
    pair = known_deformation_pair(image, tumour, SPACING, change, seed=3)
    torch.testing.assert_close(pair["moving"], image)  # the real image, unchanged
    ddf, outside = pair["true_ddf"], ~pair["non_corresponding"][0]
    assert ddf.shape == (3, *SHAPE) and ddf.abs().max() > 0.5
    warped = _warp(pair["moving"], ddf)
    assert (warped - pair["fixed"])[:, outside].abs().max() < 1e-4
    assert (warped - pair["fixed"])[:, ~outside].abs().max() > 0.1  # the change is really there
    # the non-corresponding region holds the (changed) tumour and stays a small part of the brain
    assert (pair["fixed_tumour"] & ~pair["non_corresponding"]).sum() == 0
    assert 0 < pair["non_corresponding"].sum() < 0.5 * pair["brain"].sum()


def test_the_fixed_image_is_the_changed_image_warped_by_the_true_ddf():
    """Undo the warp where it is a pure resampling: sampling the fixed image at the inverse is not needed, because
    with a zero mass effect and a zero random field the fixed image IS the changed image."""
    image, tumour, _ = _case()
    still = known_deformation_pair(image, tumour, SPACING, "growth", seed=5, mass_effect_mm=(0.0, 0.0), smooth_rms_mm=0.0)
    assert still["true_ddf"].abs().max() == 0
    changed = still["fixed"]
    moved = known_deformation_pair(image, tumour, SPACING, "growth", seed=5)
    torch.testing.assert_close(moved["fixed"], _warp(changed, moved["true_ddf"]), atol=1e-5, rtol=0)


def test_growth_enlarges_and_resection_darkens_the_tumour():
    image, tumour, _ = _case()
    kwargs = {"mass_effect_mm": (0.0, 0.0), "smooth_rms_mm": 0.0}  # no deformation: compare on the same voxels
    grown = known_deformation_pair(image, tumour, SPACING, "growth", seed=1, **kwargs)
    assert grown["fixed_tumour"].sum() > 1.5 * tumour.sum() and (grown["fixed_tumour"] | ~tumour).all()
    rim = grown["fixed_tumour"][0] & ~tumour[0]
    assert grown["fixed"][:, rim].mean() > image[:, rim].mean() + 0.3  # the rim took the bright tumour intensities
    assert 3.0 <= grown["parameters"]["growth_mm"] <= 6.0
    resected = known_deformation_pair(image, tumour, SPACING, "resection", seed=1, **kwargs)
    assert resected["fixed"][:, tumour[0]].mean() < image[:, tumour[0]].mean() - 0.4  # a dark cavity in a bright tumour
    assert resected["non_corresponding"].sum() >= tumour.sum()


def test_same_seed_same_pair_other_seed_other_pair():
    image, tumour, _ = _case()
    a, b = (known_deformation_pair(image, tumour, SPACING, "growth", seed=7) for _ in range(2))
    c = known_deformation_pair(image, tumour, SPACING, "growth", seed=8)
    for key in ("fixed", "true_ddf", "non_corresponding"):
        assert torch.equal(a[key], b[key])
    assert not torch.allclose(a["true_ddf"], c["true_ddf"])
    assert a["parameters"] == b["parameters"] != c["parameters"]


def test_the_true_ddf_is_smooth_without_folding_and_has_the_drawn_sizes():
    image, tumour, _ = _case()
    for seed in range(3):
        pair = known_deformation_pair(image, tumour, SPACING, "resection", seed=seed)
        ddf = pair["true_ddf"]
        assert jacobian_determinant(ddf[None]).min() > 0.05  # no folding (the tumour core expands most)
        curvature = max((ddf.narrow(a, 2, n - 2) - 2 * ddf.narrow(a, 1, n - 2) + ddf.narrow(a, 0, n - 2)).abs().max()
                        for a, n in zip((1, 2, 3), SHAPE))
        assert curvature < 0.4  # second differences, in voxels: smooth at the scale of a voxel
        assert 2.0 <= pair["parameters"]["mass_effect_mm"] <= 5.0
    # the mass effect alone: peak push at s from the centre, pointing away from it (pull-back: towards the centre)
    centre = (16.0, 16.0, 16.0)
    mass = mass_effect_ddf(SHAPE, centre, SPACING, amplitude_mm=3.0, sigma_mm=10.0)
    length_mm = (mass * 2.0).norm(dim=0)
    assert length_mm.max() == pytest.approx(3.0, abs=0.05)
    assert mass[0, 21, 16, 16] < 0 < mass[0, 11, 16, 16]  # 10 mm either side along x
    with pytest.raises(ValueError, match="folds"):
        mass_effect_ddf(SHAPE, centre, SPACING, amplitude_mm=8.0, sigma_mm=10.0)


def test_endpoint_error_is_zero_for_the_truth_and_the_offset_in_mm_for_a_shift():
    image, tumour, _ = _case()
    pair = known_deformation_pair(image, tumour, SPACING, "growth", seed=2)
    true, region = pair["true_ddf"], pair["fixed_tumour"] | pair["non_corresponding"]
    exact = endpoint_error_by_region(true, true, region, SPACING, pair["brain"])
    assert all(v["epe_mean_mm"] == 0 and v["epe_median_mm"] == 0 and v["folding_pct"] == 0 for v in exact.values())
    shifted = true.clone()
    shifted[0] += 1.0  # one voxel along x at 2 mm
    scores = endpoint_error_by_region(shifted, true, region, SPACING, pair["brain"])
    for name in ("tumour", "band", "outside"):
        assert scores[name]["epe_mean_mm"] == pytest.approx(2.0, abs=1e-5)
        assert scores[name]["epe_median_mm"] == pytest.approx(2.0, abs=1e-5)
    anisotropic = endpoint_error_by_region(shifted, true, region, (2.0, 1.0, 3.0))
    assert anisotropic["outside"]["epe_mean_mm"] == pytest.approx(2.0, abs=1e-5)
    shifted[2] += 1.0  # and one along z at 3 mm
    both = endpoint_error_by_region(shifted, true, region, (2.0, 1.0, 3.0))
    assert both["band"]["epe_mean_mm"] == pytest.approx(13**0.5, abs=1e-5)
    with pytest.raises(ValueError, match="must be"):
        endpoint_error_by_region(true[:, :-1], true, region, SPACING)


def test_regions_partition_the_brain_and_folding_is_counted_per_region():
    _, tumour, brain = _case()
    brain = brain.clone()
    brain[0, :, :, :12] = False  # a brain that leaves out part of the band and the outside
    scores = endpoint_error_by_region(torch.zeros(3, *SHAPE), torch.zeros(3, *SHAPE), tumour, SPACING, brain)
    assert sum(v["voxels"] for v in scores.values()) == int(brain.sum())
    regions = tumour_regions(tumour, SPACING)
    assert scores["tumour"]["voxels"] == int((regions["tumour"] & brain).sum())
    assert scores["band"]["voxels"] == int((regions["band"] & brain).sum()) > 0
    no_brain = endpoint_error_by_region(torch.zeros(3, *SHAPE), torch.zeros(3, *SHAPE), tumour, SPACING)
    assert sum(v["voxels"] for v in no_brain.values()) == math.prod(SHAPE)
    folded = torch.zeros(3, *SHAPE)
    folded[0, 14:22] = -3.0 * (index_grid(SHAPE)[0, 14:22] - 14)  # x -> x - 2 (x - 14): det J = -2 between 14 and 21
    scores = endpoint_error_by_region(folded, torch.zeros(3, *SHAPE), tumour, SPACING)
    assert scores["tumour"]["folding_pct"] > 50 and scores["outside"]["folding_pct"] < scores["tumour"]["folding_pct"]


def test_consistency_mask_is_all_ones_for_an_inverse_pair_and_marks_a_perturbed_region():
    forward = torch.zeros(1, 3, *SHAPE)
    forward[:, 0], forward[:, 2] = 1.5, -0.5
    assert torch.equal(consistency_mask(forward, -forward), torch.ones(1, 1, *SHAPE))
    backward = -forward.clone()
    backward[:, 1, 8:14, 8:14, 8:14] += 3.0  # the backward field disagrees in a block
    mask = consistency_mask(forward, backward)
    # the forward map samples the backward field 1.5 voxels further along x and 0.5 back along z
    inconsistent = mask[0, 0] == 0
    assert inconsistent[9:12, 9:13, 9:14].all() and inconsistent.sum() < 7**3 * 1.5
    assert mask[0, 0, 20:, 20:, 20:].all()
    fixed = consistency_mask(forward, backward, threshold=5.0)  # a fixed threshold above the disagreement
    assert fixed.all()
    with pytest.raises(ValueError, match="same shape"):
        consistency_mask(forward, backward[..., :-1])


def test_paired_tests_give_signs_effect_sizes_and_n():
    rows = []
    for p in range(8):
        base = 2.0 + 0.1 * p
        for method, value in (("unmasked", base), ("tumour", base - 0.5 - 0.01 * p), ("consistency", base + 0.2 + 0.01 * p),
                              ("network", base + 1.0)):
            rows.append({"pair": f"p{p}", "method": method, "region": "tumour", "epe_mean_mm": value})
        rows.append({"pair": f"p{p}", "method": "unmasked", "region": "band", "epe_mean_mm": 1.0})
        rows.append({"pair": f"p{p}", "method": "tumour", "region": "band", "epe_mean_mm": 1.0 if p < 7 else float("nan")})
    tests = {(t["method"], t["region"]): t for t in benchmark.paired_tests(rows)}
    assert set(tests) == {("tumour", "tumour"), ("consistency", "tumour"), ("tumour", "band")}  # no network row
    better, worse = tests[("tumour", "tumour")], tests[("consistency", "tumour")]
    assert better["n"] == worse["n"] == 8
    assert better["median_difference_mm"] < 0 and better["rank_biserial"] == -1.0
    assert worse["median_difference_mm"] > 0 and worse["rank_biserial"] == 1.0
    assert better["p_value"] == pytest.approx(2 / 2**8)  # exact two-sided p of 8 same-sign differences
    same = tests[("tumour", "band")]
    assert same["n"] == 7 and same["median_difference_mm"] == 0 and math.isnan(same["p_value"])  # the NaN pair dropped


def _fake_data(root):
    """Every subject of the tumour split as a tiny prepared case (2 mm grid, 2 channels, a spherical tumour)."""
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    for k, subject in enumerate(load_split("tumour")["subjects"]):
        image, tumour, _ = _case(seed=k)
        for c, sequence in enumerate(("t1c", "flair")):
            write_nifti(image[c : c + 1].numpy(), affine, root / subject / f"{sequence}.nii.gz")
        write_nifti(tumour.numpy().astype(np.uint8), affine, root / subject / "tumour.nii.gz")


def test_make_run_report_chain_on_a_tiny_campaign(tmp_path, capsys):
    data, out, results = tmp_path / "data", tmp_path / "pairs_out", tmp_path / "results"
    _fake_data(data)
    paths = ["--data", str(data), "--out", str(out), "--results", str(results)]
    benchmark.main(["make", *paths])
    pairs = json.loads((out / "pairs.json").read_text())["pairs"]
    split = load_split("tumour")
    assert len(pairs) == 2 * len(split["subjects"])
    assert {(p["fold"], p["subject"]) for p in pairs} == set(benchmark.held_out_subjects(split))
    assert all((out / p["folder"] / f).is_file() for p in pairs for f in benchmark.PAIR_FILES.values())

    pattern = str(tmp_path / "models" / "tumour_{fold}" / "model.pt")
    with pytest.raises(SystemExit, match="checkpoint not found: .*tumour_fold0/model.pt"):
        benchmark.main(["run", *paths, "--ckpt-pattern", pattern, "--limit", "1"])
    constant = _constant_flow_checkpoints(tmp_path / "models", split["folds"])
    benchmark.main(["run", *paths, "--ckpt-pattern", pattern, "--limit", "2", "--steps", "2"])
    rows = _rows(results / "known_deformation_pairs.csv")
    methods = ("network", *benchmark.METHODS)
    assert len(rows) == 2 * len(methods) * 3
    assert {(r["pair"], r["method"], r["region"]) for r in rows} == {
        (p["name"], m, g) for p in pairs[:2] for m in methods for g in ("tumour", "band", "outside")}
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("epe_mean_mm", "epe_median_mm", "folding_pct"))
    assert all(float(r["epe_mean_mm"]) > 0 and r["refinement_steps"] == "2" and "CPU" in r["hardware"] for r in rows)
    assert {float(r["excluded_pct"]) for r in rows if r["method"] == "unmasked"} == {0.0}
    # the network's constant field, taken from its RAS network grid to the pair's LPS-stored grid (x and y flip sign)
    # and scored against the true DDF of the pair's files
    first = out / pairs[0]["folder"]
    true = torch.as_tensor(np.moveaxis(np.asarray(nib.load(str(first / "true_ddf.nii.gz")).dataobj)[..., 0, :], -1, 0))
    region = torch.as_tensor((_mask(first / "fixed_tumour.nii.gz") | _mask(first / "non_corresponding.nii.gz"))[None])
    predicted = (constant * torch.tensor([-1.0, -1.0, 1.0])).view(3, 1, 1, 1).expand_as(true)
    expected = endpoint_error_by_region(predicted, true, region, SPACING, torch.as_tensor(_mask(first / "brain.nii.gz"))[None])
    for r in rows:
        if r["pair"] == pairs[0]["name"] and r["method"] == "network":
            assert float(r["epe_mean_mm"]) == pytest.approx(expected[r["region"]]["epe_mean_mm"], abs=2e-3)

    # an interrupted run resumes: the pairs already scored are kept, not registered again
    before = (results / "known_deformation_pairs.csv").read_text()
    capsys.readouterr()
    benchmark.main(["run", *paths, "--ckpt-pattern", pattern, "--limit", "2", "--steps", "2"])
    assert capsys.readouterr().out.count("scored earlier, kept") == 2
    assert (results / "known_deformation_pairs.csv").read_text() == before
    with pytest.raises(SystemExit, match="holds another run.*--fresh"):  # other methods: never mixed into one table
        benchmark.main(["run", *paths, "--ckpt-pattern", pattern, "--limit", "2", "--steps", "2", "--methods", "unmasked"])

    benchmark.main(["report", "--results", str(results)])
    tests = _rows(results / "known_deformation.csv")
    assert {(t["method"], t["region"]) for t in tests} == {
        (m, g) for m in ("tumour", "consistency", "tumour+consistency") for g in ("tumour", "band", "outside")}
    assert all(t["n"] == "2" and t["baseline"] == "unmasked" and "--steps 2" in t["command"] for t in tests)
    markdown = (results / "known_deformation.md").read_text()
    assert "| tumour+consistency | outside | 2 |" in markdown and "CPU" in markdown
    with pytest.raises(SystemExit, match="known_deformation_pairs.csv not found"):
        benchmark.main(["report", "--results", str(tmp_path / "nowhere")])

    # the true tumour masks: the tumour method then excludes voxels and its refinement differs from the unmasked one
    benchmark.main(["run", *paths, "--ckpt-pattern", pattern, "--limit", "1", "--steps", "2", "--masks", "truth",
                    "--methods", "unmasked,tumour", "--fresh"])
    rows = {(r["method"], r["region"]): r for r in _rows(results / "known_deformation_pairs.csv")}
    assert float(rows[("tumour", "outside")]["excluded_pct"]) > 1 and rows[("tumour", "outside")]["masks"] == "truth"
    assert any(rows[("tumour", g)]["epe_mean_mm"] != rows[("unmasked", g)]["epe_mean_mm"] for g in ("tumour", "band", "outside"))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mask(path):
    return np.asarray(nib.load(str(path)).dataobj) > 0


def _constant_flow_checkpoints(folder, folds):
    """The campaign's joint network with random weights but a constant DDF (the zero-initialised flow layer's bias
    set), saved as every fold's checkpoint; returns the DDF it predicts, in voxels of the network grid."""
    torch.manual_seed(0)
    network = read_config(REPO_ROOT, benchmark.NETWORK_CONFIGS).get_parsed_content("network_def").eval()
    state = network.state_dict()
    flow = [k for k, v in state.items() if k.endswith(".bias") and v.shape == (3,)
            and torch.count_nonzero(state[k.removesuffix("bias") + "weight"]) == 0]
    assert len(flow) == 1, flow
    state[flow[0]] = torch.tensor([0.4, -0.3, 0.2])
    network.load_state_dict(state)
    with torch.no_grad():
        ddf = network(torch.rand(1, 4, 32, 32, 32))[0, :3]
    constant = ddf.mean((1, 2, 3))
    torch.testing.assert_close(ddf, constant.view(3, 1, 1, 1).expand_as(ddf))
    for fold in folds:
        path = folder / f"tumour_{fold}" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save(state, path)
    return constant
