"""benchmarks/campaign.py: the fixed splits, the LPBA40 pairs, the training command and the log summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import campaign  # noqa: E402

from bundle.data import load_split  # noqa: E402
from bundle.engines import TrainingLog  # noqa: E402


def _split(name):
    return load_split(name)


@pytest.mark.parametrize("name", ("lpba40", "ibsr", "synthseg"))
def test_splits_are_disjoint(name):
    split = _split(name)
    sections = [set(split[k]) for k in ("training", "validation", "testing")]
    assert all(sections)
    assert not (sections[0] & sections[1]) and not (sections[0] & sections[2]) and not (sections[1] & sections[2])


def test_lpba40_split_covers_the_16_subjects_and_56_structures():
    split = _split("lpba40")
    subjects = split["training"] + split["validation"] + split["testing"]
    assert sorted(subjects) == sorted(["S01"] + [f"S{i}" for i in range(11, 26)])
    assert len(split["label_values"]) == 56 and len(set(split["label_values"])) == 56 and 0 not in split["label_values"]


def test_lpba40_pairs_are_all_ordered_pairs_with_labels():
    if not (campaign.DATA / "lpba40" / "S21" / "S21.nii.gz").is_file():
        pytest.skip("LPBA40 not in ../shared/data")
    pairs = campaign.lpba40_pairs(_split("lpba40"), "training")
    assert len(pairs) == 10 * 9
    assert {p["name"] for p in pairs} >= {"lpba40_S11_to_S12", "lpba40_S12_to_S11"}
    assert all(p["moving"] != p["fixed"] and p["moving_label"].endswith("_label.nii.gz") for p in pairs)
    test_subjects = set(_split("lpba40")["testing"])
    assert not any(s in p["moving"] or s in p["fixed"] for p in pairs for s in test_subjects)


def test_lpba40_class_maps_follow_the_split_order(tmp_path):
    if not (campaign.DATA / "lpba40" / "S21" / "S21_label.nii.gz").is_file():
        pytest.skip("LPBA40 not in ../shared/data")
    import nibabel as nib
    import numpy as np

    split = _split("lpba40")
    pairs = campaign.lpba40_pairs(split, "validation", tmp_path)
    assert {p["moving_label"] for p in pairs} == {str(tmp_path / "S21_classes.nii.gz"), str(tmp_path / "S22_classes.nii.gz")}
    original = np.asarray(nib.load(campaign.DATA / "lpba40" / "S21" / "S21_label.nii.gz").dataobj).reshape(-1)
    classes = np.asarray(nib.load(tmp_path / "S21_classes.nii.gz").dataobj).reshape(-1)
    assert classes.dtype == np.uint8 and classes.max() <= 56
    for k, value in enumerate(split["label_values"][:5], start=1):
        assert np.array_equal(classes == k, original == value)


def test_synthetic_pairs_are_aligned_label_maps_flagged_for_synthesis(tmp_path):
    if not (campaign.DATA / "synthseg_label_maps" / "training_seg_02.nii.gz").is_file():
        pytest.skip("SynthSeg label maps not in ../shared/data")
    import nibabel as nib
    import numpy as np

    split = {"training": ["01", "02"]}
    pairs = campaign.synthseg_pairs(split, tmp_path, count=5)
    assert sorted(p["name"] for p in pairs) == ["synthseg_01_to_02", "synthseg_02_to_01"]  # all there are
    for p in pairs:
        assert p["synthesise"] is True and p["moving"] == p["moving_label"] and p["fixed"] == p["fixed_label"]
    ref, other = (nib.load(tmp_path / f"synthseg_{s}_label.nii.gz") for s in ("01", "02"))
    assert ref.shape == other.shape and np.allclose(ref.affine, other.affine)  # one grid, cropped to the brain
    a, b = (np.isin(np.asarray(i.dataobj), [2, 41]) for i in (ref, other))  # white matter overlaps once aligned
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.6


def test_lpba40_pairs_name_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "DATA", tmp_path)
    with pytest.raises(FileNotFoundError, match="S11.nii.gz"):
        campaign.lpba40_pairs({"training": ["S11", "S12"]}, "training")


def test_training_command_uses_the_recipe_overlays(tmp_path):
    args = campaign.training_command(tmp_path / "datalist.json", tmp_path / "run", 2, ["--epoch_length", "5"])
    assert args[1:5] == ["-m", "monai.bundle", "run", "training"]
    configs = args[args.index("--config_file") + 1]
    assert all(n in configs for n in ("train.json", "registration_only.json", "campaign.json"))
    assert "--label_values" not in args  # LPBA40 class maps are written by prepare (synthetic pairs keep FreeSurfer values)
    assert args[-2:] == ["--epoch_length", "5"] and args[args.index("--num_threads") + 1] == "2"
    assert args[args.index("--training_log") + 1] == str(tmp_path / "run" / "training_log.csv")  # committed with the run


def test_the_conditioned_run_starts_from_the_plain_runs_weights(tmp_path):
    """The conditioned run's recipe builds the FiLM-conditioned network, loads the plain weights it names (FiLM
    layers zero: the plain network's field at any λ), trains over the stated λ range and validates at one λ."""
    import torch
    from monai.bundle import ConfigParser

    from bundle.engines import RegistrationPrepareBatch
    from bundle.networks import ConditionedRegistrationUNet, RegistrationUNet

    configs, shipped = campaign.RECIPES["registration_t1_conditioned"]
    assert shipped != campaign.SHIPPED and configs[: len(campaign.RECIPE)] == campaign.RECIPE
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(tmp_path)
    torch.manual_seed(0)
    reference = RegistrationUNet(3, 2, half_res=True, integration_steps=7)
    torch.nn.init.normal_(reference.head.conv.weight, std=0.05)
    init = Path(parser.get_parsed_content("init_ckpt"))
    assert init.parent == tmp_path / "init"
    init.parent.mkdir()
    torch.save(reference.state_dict(), init)
    network = parser.get_parsed_content("initial_network")
    assert isinstance(network, ConditionedRegistrationUNet)
    assert network.weight_range == tuple(parser.get_parsed_content("regularisation_range"))
    batch = {"moving": torch.rand(1, 1, 16, 16, 16), "fixed": torch.rand(1, 1, 16, 16, 16)}
    validation_weight = parser.get_parsed_content("regularisation_weight")
    inputs, _ = RegistrationPrepareBatch(regularisation_weight=validation_weight)(batch)
    with torch.no_grad():
        torch.testing.assert_close(network(inputs), reference(torch.cat([batch["moving"], batch["fixed"]], 1)))


@pytest.mark.parametrize("lam", campaign.FIXED_LAMBDAS)
def test_the_fixed_lambda_runs_start_where_the_conditioned_run_started_with_its_budget(tmp_path, lam):
    """Issue 17's references: a plain network with the smoothness weight fixed at λ, from the conditioned run's
    starting weights, at its learning rate, for 1,800 iterations (its snapshot's), validated on the same pairs."""
    import torch
    from monai.bundle import ConfigParser

    from bundle.networks import RegistrationUNet

    run = f"registration_t1_lambda_{lam:g}"
    configs, shipped = campaign.RECIPES[run]
    conditioned, _ = campaign.RECIPES["registration_t1_conditioned"]
    assert shipped.name == f"registration_t1_lambda_{lam:g}_2mm.pt" and configs[: len(campaign.RECIPE)] == campaign.RECIPE
    assert campaign.RUN_OVERRIDES[run] == ["--smoothness_weight", f"{lam:g}"]
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(tmp_path / "campaign" / run)
    parser["smoothness_weight"] = lam
    reference = ConfigParser()
    reference.read_config([str(REPO_ROOT / "configs" / c) for c in conditioned])
    reference["bundle_root"] = str(tmp_path / "campaign" / "registration_t1_conditioned")
    init = Path(parser.get_parsed_content("init_ckpt"))
    assert init == Path(reference.get_parsed_content("init_ckpt"))  # the same starting weights
    assert parser.get_parsed_content("learning_rate") == reference.get_parsed_content("learning_rate")
    assert parser.get_parsed_content("epoch_length") * parser.get_parsed_content("max_epochs") == 1800
    init.parent.mkdir(parents=True)
    torch.save(RegistrationUNet(3, 2, half_res=True, integration_steps=7).state_dict(), init)
    assert type(parser.get_parsed_content("initial_network")) is RegistrationUNet
    assert parser.get_parsed_content("loss").smoothness_weight == lam


def test_the_search_run_builds_the_searchable_network_at_4_mm(tmp_path):
    from monai.bundle import ConfigParser

    from bundle.networks import OPERATIONS, SearchableRegistrationUNet

    configs, _ = campaign.RECIPES["autoreg_search"]
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(tmp_path)
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, SearchableRegistrationUNet)
    assert network.mixed_operations()[0].names == list(OPERATIONS)
    assert network.num_blocks == 11  # a half-width proxy of VM-2: the same blocks, so its genotype fits VM-2
    assert network.mixed_operations()[0].ops[0][0].out_channels == 8
    assert parser.get_parsed_content("pixdim") == [4.0, 4.0, 4.0]
    assert parser.get_parsed_content("epoch_length") * parser.get_parsed_content("max_epochs") == 600
    assert parser.get_parsed_content("early_stop_patience") >= parser.get_parsed_content("max_epochs")  # no early stop
    assert parser.get_parsed_content("architecture_search").optimizer.param_groups[0]["lr"] == 0.003


def test_train_without_prepare_names_the_missing_datalist(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist.json"):
        campaign.train(None, 1, [], out=tmp_path, root=tmp_path / "run")


def test_status_and_plot_read_the_training_log(tmp_path):
    log = TrainingLog(tmp_path / "training_log.csv", hardware="test")
    for it, dice in ((10, 0.6), (20, 0.7), (30, 0.65)):
        log._write({"kind": "train", "iteration": it, "epoch": 1, "loss": 0.1, "similarity": -0.2, "label_dice": 0.3,
                    "wall_s": it, "hardware": "test"})
        log._write({"kind": "validation", "iteration": it, "epoch": 1, "metrics": f"val_mean_dice={dice};val_folding_pct=0.0",
                    "wall_s": it, "hardware": "test"})
    info = campaign.status(tmp_path)
    assert info["iterations"] == 30 and info["best_val_mean_dice"] == 0.7 and info["best_iteration"] == 20
    # another key metric (the tumour campaign's): its best, not val_mean_dice's
    log._write({"kind": "validation", "iteration": 40, "epoch": 1, "metrics": "val_tumour_dice_fixed=0.5", "wall_s": 40,
                "hardware": "test"})
    info = campaign.status(tmp_path, key="val_tumour_dice_fixed")
    assert info["best_val_tumour_dice_fixed"] == 0.5 and info["best_iteration"] == 40
    pytest.importorskip("matplotlib")
    figure = campaign.plot(tmp_path, tmp_path / "curve.png")
    assert figure.stat().st_size > 1000


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_train_stops_at_the_next_checkpoint_after_the_time_limit(tmp_path, monkeypatch, sigint):
    """A fake run writes a checkpoint every 1.5 s and never ends: --minutes stops it right after a new checkpoint,
    also when the campaign was started with SIGINT ignored (``nohup ... &`` in a script: the child inherits it)."""
    import signal

    (tmp_path / "datalist.json").write_text("{}")
    root = tmp_path / "run"
    script = (
        "import time, pathlib, itertools\n"
        f"d = pathlib.Path({str(root / 'models')!r}); d.mkdir(parents=True, exist_ok=True)\n"
        "for i in itertools.count():\n"
        "    time.sleep(1.5); (d / f'checkpoint_epoch={i}.pt').write_text('x')\n"
    )
    monkeypatch.setattr(campaign, "training_command", lambda *a: [sys.executable, "-c", script])
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint == "ignored" else None
    start = __import__("time").time()
    try:
        assert campaign.train(0.02, 1, [], out=tmp_path, root=root, grace_minutes=0.5) == 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    elapsed = __import__("time").time() - start
    checkpoints = sorted((root / "models").glob("checkpoint*.pt"))
    # stopped by SIGINT after a checkpoint: well before the 30 s grace (and the 60 s wait before SIGTERM)
    assert checkpoints and elapsed < 25, elapsed
    assert (root / "train.log").read_text().count("# ") == 1


def _fake_run(root: Path, epochs: int | None) -> str:
    """A training process that writes a checkpoint every 1 s and ends after ``epochs`` of them (never: None)."""
    return (
        "import time, pathlib, itertools\n"
        f"d = pathlib.Path({str(root / 'models')!r}); d.mkdir(parents=True, exist_ok=True)\n"
        f"for i in itertools.count() if {epochs!r} is None else range({epochs!r}):\n"
        "    time.sleep(1.0); (d / f'checkpoint_epoch={i}.pt').write_text('x')\n"
    )


def test_a_run_that_ends_on_its_own_is_marked_finished_and_not_trained_again(tmp_path, monkeypatch, capsys):
    (tmp_path / "datalist.json").write_text("{}")
    root = tmp_path / "run"
    log = TrainingLog(root / "training_log.csv", hardware="test")
    log._write({"kind": "validation", "iteration": 20, "epoch": 2, "metrics": "val_mean_dice=0.7", "wall_s": 2,
                "hardware": "test"})
    runs = []

    def command(*args):
        runs.append(args)
        return [sys.executable, "-c", _fake_run(root, epochs=2)]

    monkeypatch.setattr(campaign, "training_command", command)
    assert campaign.train_run(5, 1, [], root=root, out=tmp_path) == 0
    assert campaign.finished(root) and len(runs) == 1
    info = json.loads((root / "finished.json").read_text())
    assert info["best_val_mean_dice"] == 0.7 and info["best_iteration"] == 20 and info["finished"]
    assert campaign.train_run(5, 1, [], root=root, out=tmp_path) == 0
    assert len(runs) == 1 and "nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize("outcome", ["stopped by the clock", "failed"])
def test_a_run_stopped_by_the_clock_or_failing_is_not_marked_finished(tmp_path, monkeypatch, outcome):
    (tmp_path / "datalist.json").write_text("{}")
    root = tmp_path / "run"
    script = _fake_run(root, epochs=None) if outcome == "stopped by the clock" else "raise SystemExit(3)"
    monkeypatch.setattr(campaign, "training_command", lambda *a: [sys.executable, "-c", script])
    rc = campaign.train_run(0.02, 1, [], root=root, out=tmp_path)
    assert rc == (0 if outcome == "stopped by the clock" else 3)
    assert not campaign.finished(root) and not (root / "finished.json").exists()


def test_the_probabilistic_features_run_is_the_lambda_1_reference_with_gaussian_features(tmp_path):
    """The ablation differs from ``registration_t1_lambda_1`` only by the Gaussian encoder features and the KL term:
    same starting weights (loaded into the plain part, the Gaussians start as the identity), λ, rate and budget."""
    import torch
    from monai.bundle import ConfigParser

    from bundle.losses import FeatureKLLoss
    from bundle.networks import ProbabilisticRegistrationUNet, RegistrationUNet

    configs, shipped = campaign.RECIPES["registration_t1_probabilistic"]
    reference, _ = campaign.RECIPES["registration_t1_lambda_1"]
    assert configs[: len(reference)] == reference and shipped.name == "registration_t1_probabilistic_2mm.pt"
    assert campaign.RUN_OVERRIDES["registration_t1_probabilistic"] == campaign.RUN_OVERRIDES["registration_t1_lambda_1"]
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(tmp_path / "campaign" / "registration_t1_probabilistic")
    init = Path(parser.get_parsed_content("init_ckpt"))
    init.parent.mkdir(parents=True)
    plain = RegistrationUNet(3, 2, half_res=True, integration_steps=7)
    torch.save(plain.state_dict(), init)
    network = parser.get_parsed_content("initial_network")
    assert isinstance(network, ProbabilisticRegistrationUNet)
    torch.testing.assert_close(network.encoder.state_dict(), plain.encoder.state_dict())
    assert isinstance(parser.get_parsed_content("train#trainer#loss_function"), FeatureKLLoss)
    assert parser.get_parsed_content("epoch_length") * parser.get_parsed_content("max_epochs") == 1800
    network.eval()
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():  # at the start, the mean features are the plain network's
        torch.testing.assert_close(network(x), plain.eval()(x), atol=1e-5, rtol=1e-4)


def test_the_fixed_lambda_test_script_scores_the_runs_the_campaign_trains():
    """benchmarks/fixed_lambda_test.sh compares the conditioned snapshot with the three fixed-λ runs at their λ:
    the same λ values as campaign.FIXED_LAMBDAS, the committed snapshot, the runs' best weights."""
    import re

    script = (REPO_ROOT / "benchmarks" / "fixed_lambda_test.sh").read_text()
    weights = re.search(r"for weight in ([0-9. ]+); do", script).group(1).split()
    assert [float(w) for w in weights] == list(campaign.FIXED_LAMBDAS)
    assert all(f"registration_t1_lambda_{float(w):g}" in campaign.RECIPES for w in weights)
    snapshot = re.search(r"snapshot=(\S+)", script).group(1)
    assert (REPO_ROOT / snapshot).is_file()
    assert "registration_t1_lambda_${weight}/models/model.pt" in script and "regularisation_weight=${weight}" in script


def test_the_searched_run_trains_the_frozen_genotype_from_scratch_like_the_plain_run(tmp_path):
    """``registration_t1_autoreg``: the plain recipe (2 mm, from scratch) with the search's genotype, frozen into the
    run on its first start (a search that goes on does not change it), 2,000 iterations."""
    from monai.bundle import ConfigParser

    from bundle.networks import SearchedRegistrationUNet

    search, root = tmp_path / "autoreg_search", tmp_path / "registration_t1_autoreg"
    with pytest.raises(FileNotFoundError, match="has not finished"):
        campaign.freeze_genotype(root, search)
    genotype = ["conv_1", "sep_conv_3", "dil_conv_5", "conv_3", "conv_5", "sep_conv_5", "dil_conv_3", "dil_conv_7",
                "conv_3", "conv_3", "conv_1"]
    search.mkdir()
    (search / "genotype.json").write_text(json.dumps({"iteration": 2000, "genotype": genotype}))
    (search / "finished.json").write_text("{}")
    frozen = campaign.freeze_genotype(root, search)
    (search / "genotype.json").write_text(json.dumps({"genotype": ["conv_3"] * 11}))  # the search moves on
    assert campaign.freeze_genotype(root, search) == frozen == root / "genotype.json"
    assert json.loads(frozen.read_text())["genotype"] == genotype
    configs, shipped = campaign.RECIPES["registration_t1_autoreg"]
    assert configs[: len(campaign.RECIPE)] == campaign.RECIPE and campaign.RUN_SETUP["registration_t1_autoreg"]
    assert shipped.name == "registration_t1_autoreg_2mm.pt"
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("initial_network")
    assert isinstance(network, SearchedRegistrationUNet) and network.genotype == genotype
    assert parser.get_parsed_content("init_ckpt") is None  # from scratch, as the plain run
    assert parser.get_parsed_content("pixdim") == [2.0, 2.0, 2.0]
    assert parser.get_parsed_content("epoch_length") * parser.get_parsed_content("max_epochs") == 2000


def test_the_searched_run_does_not_start_before_the_search_finished(tmp_path, monkeypatch):
    (tmp_path / "datalist.json").write_text("{}")
    monkeypatch.setattr(campaign, "CAMPAIGNS", tmp_path)
    monkeypatch.setitem(campaign.RUN_SETUP, "registration_t1_autoreg",
                        lambda root: campaign.freeze_genotype(root, tmp_path / "autoreg_search"))
    monkeypatch.setattr(campaign, "train", lambda *a, **k: pytest.fail("trained without a genotype"))
    with pytest.raises(FileNotFoundError, match="autoreg_search.finished.json not found"):
        campaign.train_run(1, 1, [], root=tmp_path / "registration_t1_autoreg", out=tmp_path)


def test_the_all_3_conv_reference_is_the_plain_network_trained_like_the_searched_one(tmp_path):
    from monai.bundle import ConfigParser

    from bundle.networks import RegistrationUNet, SearchedRegistrationUNet

    assert campaign.RECIPES["registration_t1_all3conv"][0] == campaign.RECIPES["registration_t1_autoreg"][0]
    root = tmp_path / "registration_t1_all3conv"
    genotype = campaign.RUN_SETUP["registration_t1_all3conv"](root)
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / c) for c in campaign.RECIPES["registration_t1_all3conv"][0]])
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("initial_network")
    assert isinstance(network, SearchedRegistrationUNet) and set(json.loads(genotype.read_text())["genotype"]) == {"conv_3"}
    plain = RegistrationUNet(3, 2, half_res=True, integration_steps=7)
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in plain.parameters())


def test_the_ablation_test_script_scores_each_run_against_its_reference_with_the_runs_configs():
    """benchmarks/ablation_test.sh: the runs it scores are campaign runs, and each is rebuilt at inference with the
    overlays of its training configs (the probabilistic encoder, the searched genotype)."""
    import re

    script = (REPO_ROOT / "benchmarks" / "ablation_test.sh").read_text()
    base = re.search(r"^base=(\S+)", script, re.M).group(1)
    specs = re.findall(r"(\w+):(registration_t1_\w+):(\$base[\w.,]*)", script)
    assert [(n, r) for n, r, _ in specs] == [("fixed_l1", "registration_t1_lambda_1"),
                                             ("probabilistic", "registration_t1_probabilistic"),
                                             ("all3conv", "registration_t1_all3conv"), ("autoreg", "registration_t1_autoreg")]
    for _, run, configs in specs:
        inference = configs.replace("$base", base).split(",")
        training = campaign.RECIPES[run][0]
        assert inference[:3] == ["inference.json", "registration_only.json", "campaign.json"]
        network_overlays = {"probabilistic_features.json", "autoreg_searched.json"}
        assert set(inference[3:]) == network_overlays & set(training)


def test_the_ablation_test_script_scores_nothing_before_both_runs_finished(tmp_path):
    import shutil
    import subprocess

    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO_ROOT / "benchmarks" / "ablation_test.sh", tmp_path / "benchmarks")
    done = tmp_path / "models" / "campaign" / "registration_t1_lambda_1"
    done.mkdir(parents=True)
    (done / "finished.json").write_text("{}")
    result = subprocess.run(["bash", str(tmp_path / "benchmarks" / "ablation_test.sh"), "probabilistic"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and not (tmp_path / "runs").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(
        "ablation_test.sh: error: models/campaign/registration_t1_probabilistic/finished.json is missing")
    result = subprocess.run(["bash", str(tmp_path / "benchmarks" / "ablation_test.sh"), "dropout"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown ablation 'dropout'" in result.stderr


def test_plots_name_each_runs_network_grid():
    assert campaign.network_grid_mm(campaign.RECIPES["registration_t1"][0]) == 2.0
    assert campaign.network_grid_mm(campaign.RECIPES["autoreg_search"][0]) == 4.0
    assert campaign.network_grid_mm(campaign.RECIPES["registration_t1_autoreg"][0]) == 2.0
