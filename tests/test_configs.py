"""``bundle.configs``: the config plumbing the CLI, the MONAI Label app and the benchmarks share, and the
overlays it reads (variants replace objects; no run-time branch on the model kind)."""

from __future__ import annotations

import ast
import json
import sys

import pytest
import torch

from bundle.configs import REPO_ROOT, bundle_command, config_file_arg, config_paths, is_registration_only, read_config
from bundle.networks import JointRegSegNet, RegistrationUNet, TumourSegmentationNet
from conftest import CONFIGS


def test_config_paths_in_order_and_missing_ones_named(tmp_path):
    assert config_paths(REPO_ROOT, ["train.json", "campaign.json"]) == [str(CONFIGS / "train.json"), str(CONFIGS / "campaign.json")]
    with pytest.raises(FileNotFoundError, match=r"\['absent.json'\]"):
        config_paths(REPO_ROOT, ["inference.json", "absent.json"])
    assert config_file_arg(REPO_ROOT, ["inference.json"]) == str(CONFIGS / "inference.json")
    assert ast.literal_eval(config_file_arg(REPO_ROOT, ["inference.json", "registration_only.json"])) == [
        str(CONFIGS / "inference.json"), str(CONFIGS / "registration_only.json")]


def test_read_config_overlays_and_overrides(tmp_path):
    joint = read_config(REPO_ROOT, ["inference.json"], {"pixdim": [2.0, 2.0, 2.0]})
    assert joint["bundle_root"] == str(REPO_ROOT) and joint.get_parsed_content("pixdim") == [2.0, 2.0, 2.0]
    assert isinstance(joint.get_parsed_content("network_def"), JointRegSegNet)
    reg = read_config(REPO_ROOT, ["inference.json", "registration_only.json"])
    assert isinstance(reg.get_parsed_content("network_def"), RegistrationUNet)
    seg = read_config(REPO_ROOT, ["inference.json", "inference_segmentation.json"])
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


def test_no_config_branches_on_the_model_kind():
    """Variants are overlays that replace objects: no config tests which network it built."""
    for path in CONFIGS.glob("*.json"):
        text = path.read_text()
        assert "joint_model" not in text and "isinstance(@network_def" not in text, path.name
        json.loads(text)
