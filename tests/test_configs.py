"""``bundle.configs``: the config plumbing the CLI, the MONAI Label app and the benchmarks share, and the
overlays it reads (variants replace objects; no run-time branch on the model kind)."""

from __future__ import annotations

import ast
import json
import sys

import pytest
import torch

from bundle.configs import (
    REPO_ROOT,
    bundle_command,
    checkpoint_overlays,
    config_file_arg,
    config_paths,
    is_registration_only,
    read_config,
)
from bundle.networks import ConditionedRegistrationUNet, JointRegSegNet, RegistrationUNet, TumourSegmentationNet
from conftest import CONFIGS


def test_config_paths_in_order_and_missing_ones_named(tmp_path):
    assert config_paths(REPO_ROOT, ["train.json", "campaign.json"]) == [str(CONFIGS / "train.json"), str(CONFIGS / "campaign.json")]
    with pytest.raises(FileNotFoundError, match=r"\['absent.json'\]"):
        config_paths(REPO_ROOT, ["inference.json", "absent.json"])
    assert config_file_arg(REPO_ROOT, ["inference.json"]) == str(CONFIGS / "inference.json")
    assert ast.literal_eval(config_file_arg(REPO_ROOT, ["inference.json", "registration_only.json"])) == [
        str(CONFIGS / "inference.json"), str(CONFIGS / "registration_only.json")]


def test_read_config_overlays_and_overrides(tmp_path):
    shipped = read_config(REPO_ROOT, ["inference.json"], {"pixdim": [4.0, 4.0, 4.0]})
    assert shipped["bundle_root"] == str(REPO_ROOT) and shipped.get_parsed_content("pixdim") == [4.0, 4.0, 4.0]
    network = shipped.get_parsed_content("network_def")
    assert isinstance(network, ConditionedRegistrationUNet) and network.head.half_res  # the campaign's registration model
    assert shipped.get_parsed_content("prepare_batch").regularisation_weight == shipped.get_parsed_content("regularisation_weight")
    joint = read_config(REPO_ROOT, ["inference.json", "joint.json"])
    assert isinstance(joint.get_parsed_content("network_def"), JointRegSegNet)
    assert joint.get_parsed_content("prepare_batch").regularisation_weight is None
    assert joint.get_parsed_content("ckpt_path").endswith("joint_t1_ibsr_4mm.pt")
    reg = read_config(REPO_ROOT, ["inference.json", "registration_only.json"])
    network = reg.get_parsed_content("network_def")
    assert type(network) is RegistrationUNet and reg.get_parsed_content("prepare_batch").regularisation_weight is None
    seg = read_config(REPO_ROOT, ["inference.json", "joint.json", "inference_segmentation.json"])
    assert isinstance(seg.get_parsed_content("network_def"), TumourSegmentationNet)


def test_bundle_command_line():
    args = bundle_command("training", REPO_ROOT, ["train.json", "registration_only.json"],
                          {"bundle_root": "/runs/x", "pixdim": [2.0, 2.0, 2.0], "progress_bar": False})
    assert args[:5] == [sys.executable, "-m", "monai.bundle", "run", "training"]
    assert args[args.index("--bundle_root") + 1] == "/runs/x"  # an override wins over the configs' folder
    assert args.count("--bundle_root") == 1
    assert ast.literal_eval(args[args.index("--pixdim") + 1]) == [2.0, 2.0, 2.0]
    assert args[args.index("--progress_bar") + 1] == "False"


def test_registration_only_state_dicts_are_recognised():
    reg = RegistrationUNet(spatial_dims=3, in_channels=2).state_dict()
    joint = JointRegSegNet(spatial_dims=3).state_dict()
    assert is_registration_only(reg) and not is_registration_only(joint)
    assert is_registration_only({f"module.{k}": v for k, v in reg.items()})  # a DDP checkpoint
    assert not is_registration_only({"x": torch.zeros(1)})


@pytest.mark.parametrize(
    "base, overlays, expected",
    [
        (["inference.json"], [], []),
        (["inference.json"], ["joint.json"], ["joint.json"]),
        (["inference.json"], ["registration_only.json"], ["registration_only.json"]),
        (["inference.json"], ["registration_only.json", "campaign.json"], ["registration_only.json", "campaign.json"]),
        (["inference.json"], ["registration_only.json", "regularisation_conditioned.json"],
         ["registration_only.json", "regularisation_conditioned.json"]),
        (["inference.json"], ["joint.json", "tumour.json"], ["joint.json", "tumour.json"]),
        # the shipped tumour model (oedema / tumour core) is the campaign's 3-class recipe (runs tumour_v2, v3)
        (["inference.json"], ["joint.json", "tumour_campaign.json", "tumour_regions.json"], ["joint.json", "tumour.json"]),
        # the campaign's one-class (whole tumour) recipe, run tumour: the tumour overlay with one tumour class
        (["inference.json"], ["joint.json", "tumour_campaign.json"], ["joint.json", "tumour.json", "tumour_whole.json"]),
        (["inference.json"], ["joint.json", "tumour.json", "tumour_whole.json"], ["joint.json", "tumour.json", "tumour_whole.json"]),
        (["inference.json"], ["registration_only.json", "probabilistic_features.json"],
         ["registration_only.json", "probabilistic_features.json"]),
        (["train.json"], [], []),
        (["train.json"], ["registration_only.json", "campaign.json", "regularisation_conditioned.json"],
         ["registration_only.json", "campaign.json", "regularisation_conditioned.json"]),
        (["train.json"], ["tumour_campaign.json"], ["joint.json", "tumour.json", "tumour_whole.json"]),
        (["train.json"], ["tumour_campaign.json", "tumour_regions.json"], ["joint.json", "tumour.json"]),
        (["train.json"], ["joint.json"], []),
    ],
)
def test_checkpoint_overlays_rebuild_the_network_a_state_dict_came_from(base, overlays, expected):
    """The configs chosen from a checkpoint's parameters are the ones it was built with, and take it."""
    state = read_config(REPO_ROOT, [*base, *overlays]).get_parsed_content("network_def").state_dict()
    found = checkpoint_overlays(REPO_ROOT, base, state)
    assert found == expected
    rebuilt = read_config(REPO_ROOT, [*base, *found]).get_parsed_content("network_def").state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_the_shipped_tumour_model_is_what_the_tumour_configs_load():
    """``configs/tumour.json``: T1c + FLAIR, 2 mm, brain-scaled, oedema and tumour core; its weights load strictly into the pair network and
    the segmentation-only network, and a checkpoint of it is recognised as that overlay."""
    from bundle.configs import TUMOUR_CONFIGS, TUMOUR_SEGMENTATION_CONFIGS
    from bundle.engines import load_weights
    from bundle.engines.checkpoints import network_state_dict

    pair = read_config(REPO_ROOT, TUMOUR_CONFIGS)
    path = pair.get_parsed_content("ckpt_path")
    assert path.endswith("joint_tumour_regions_t1c_flair_2mm.pt")
    assert pair.get_parsed_content("num_channels") == 2 and pair.get_parsed_content("channel_names") == ["T1c", "FLAIR"]
    assert pair.get_parsed_content("num_tumour_classes") == 3  # background, oedema, tumour core
    assert pair.get_parsed_content("pixdim") == [2.0, 2.0, 2.0] and pair.get_parsed_content("brain_scaling")
    network = load_weights(pair.get_parsed_content("network_def"), path)
    assert isinstance(network, JointRegSegNet) and network.reg_decoder is not None
    seg = read_config(REPO_ROOT, TUMOUR_SEGMENTATION_CONFIGS)
    assert isinstance(load_weights(seg.get_parsed_content("network_def"), path), TumourSegmentationNet)
    assert checkpoint_overlays(REPO_ROOT, ["inference.json"], network_state_dict(path)) == ["joint.json", "tumour.json"]
    # the one-channel T1 joint model keeps its own overlay
    assert read_config(REPO_ROOT, ["inference.json", "joint.json"]).get_parsed_content("brain_scaling") is False


def test_checkpoint_overlays_name_a_checkpoint_that_fits_no_network():
    state = RegistrationUNet(spatial_dims=3, in_channels=6).state_dict()  # 3-channel images: no config builds it
    with pytest.raises(ValueError, match="weird.pt: no network of this bundle's configs"):
        checkpoint_overlays(REPO_ROOT, ["inference.json"], state, path="weird.pt")
    joint = JointRegSegNet(spatial_dims=3).state_dict()
    with pytest.raises(ValueError, match="joint.pt is not a registration-only model"):
        checkpoint_overlays(REPO_ROOT, ["inference.json"], joint, registration_only=True, path="joint.pt")
    assert checkpoint_overlays(REPO_ROOT, ["inference.json"], {f"module.{k}": v for k, v in joint.items()}) == ["joint.json"]


def test_no_config_branches_on_the_model_kind():
    """Variants are overlays that replace objects: no config tests which network it built."""
    for path in CONFIGS.glob("*.json"):
        text = path.read_text()
        assert "joint_model" not in text and "isinstance(@network_def" not in text, path.name
        json.loads(text)


def test_tumour_labels_are_binarised_for_one_class_and_checked_for_three():
    """A one-class tumour model trains on any tumour label > 0 (BraTS 1-4 binarised); the shipped 3-class model needs
    0 / 1 oedema / 2 core maps and names a file with other values (e.g. raw BraTS labels) instead of mis-training."""
    from monai.data import MetaTensor

    def tumour_after_checks(overlays):
        transforms = read_config(REPO_ROOT, ["train.json", *overlays]).get_parsed_content("preprocessing_transforms")
        data = {"moving_tumour": MetaTensor(torch.tensor([[[[0.0, 1.0, 2.0, 4.0]]]]), meta={"filename_or_obj": "brats_seg.nii.gz"})}
        for t in transforms:
            if type(t).__name__ in ("CheckLabeld", "AsDiscreted"):
                data = t(data)
        return data["moving_tumour"]

    assert tumour_after_checks(["joint.json"]).flatten().tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"brats_seg.nii.gz.*label value 4 >= num_classes=3"):
        tumour_after_checks(["joint.json", "tumour.json"])


@pytest.mark.parametrize("base", ["train.json", "inference.json"])
def test_brain_masks_of_a_datalist_are_applied_by_training_evaluation_and_inference(tmp_path, base):
    """``*_brain_mask`` entries are never ignored: train.json's shared preprocessing (training, validation,
    ``brainreg evaluate``) and inference.json's strip the images with them before anything else."""
    import nibabel as nib
    import numpy as np

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    files = {}
    for side in ("moving", "fixed"):
        files[side] = str(tmp_path / f"{side}.nii.gz")
        nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32) + 1.0, affine), files[side])
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[4:12, 4:12, 4:12] = 1
    files["fixed_brain_mask"] = str(tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), files["fixed_brain_mask"])
    parser = read_config(REPO_ROOT, [base])
    if base == "train.json":
        transforms = parser.get_parsed_content("preprocessing_transforms")
    else:
        transforms = parser.get_parsed_content("preprocessing").transforms
    data = dict(files)
    for t in transforms:
        data = t(data)
        if type(t).__name__ == "ApplyBrainMaskd":
            break
    else:
        pytest.fail(f"{base}: no ApplyBrainMaskd in its preprocessing")
    fixed, moving = data["fixed"][0].numpy(), data["moving"][0].numpy()
    assert np.all(fixed[mask == 0] == fixed.min()) and np.all(fixed[mask > 0] > 1.0)
    assert moving.min() >= 1.0  # no mask: untouched
    assert "fixed_brain_mask" not in data
