"""The MONAI Label app's parts that need no MONAI Label: the stock ``monaibundle`` layout, the MONAI Label
config overlays, the subject split and the torchvision stand-in (the real server: test_monailabel_server.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from conftest import CONFIGS, REPO_ROOT, save_nifti, write_zero_checkpoint

from bundle.engines import load_weights
from bundle.io import OUTPUT_WRITERS
from bundle.networks import TumourSegmentationNet
from monailabel_app.lib.compat import FALLBACK_DIR
from monailabel_app.lib.stock_bundle import export_stock_bundle
from monailabel_app.lib.subjects import split_subjects

# the config ids MONAI Label 0.8.5's BundleInferTask reads and BundleTrainTask overrides
INFER_IDS = ("network_def", "preprocessing", "inferer", "postprocessing")
TRAIN_IDS = ("bundle_root", "device", "network", "train#trainer#max_epochs", "train#dataset#data", "train#handlers",
             "validate#dataset#data")
SUBJECTS = [{"image": f"/d/s{i}.nii.gz", "label": f"/d/s{i}_seg.nii.gz"} for i in range(3)]


@pytest.fixture(scope="module")
def stock_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stock")
    ckpt = write_zero_checkpoint(tmp / "joint.pt")
    return export_stock_bundle(REPO_ROOT, tmp / "app" / "model" / "brain", ckpt, {"pixdim": [4.0, 4.0, 4.0]})


def _parser(path: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(path))
    return parser


def test_stock_layout_has_the_files_monailabel_reads(stock_bundle):
    files = sorted(str(p.relative_to(stock_bundle)) for p in stock_bundle.rglob("*") if p.is_file())
    assert files == ["configs/inference.json", "configs/logging.conf", "configs/metadata.json", "configs/train.json",
                     "models/model.pt"]


def test_stock_metadata_is_valid_and_describes_the_segmentation_head(stock_bundle):
    meta_file = stock_bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(CONFIGS / "metadata_schema.json"))  # offline schema
    meta = json.loads(meta_file.read_text())
    # BundleInferTask takes the FIRST input and output, and the output's channel_def as its labels
    (in_key, image), = meta["network_data_format"]["inputs"].items()
    (out_key, pred), = meta["network_data_format"]["outputs"].items()
    assert (in_key, out_key) == ("image", "pred")
    assert pred["channel_def"] == {"0": "background", "1": "tumour"}
    assert image["num_channels"] == 1
    assert meta["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]


def test_stock_inference_config_is_the_segmentation_without_writer(stock_bundle):
    parser = _parser(stock_bundle / "configs" / "inference.json")
    assert all(k in parser for k in INFER_IDS)
    assert parser["pixdim"] == [4.0, 4.0, 4.0] and parser["bundle_root"] == "."
    parser["bundle_root"] = str(stock_bundle)  # what BundleInferTask sets
    network = parser.get_parsed_content("network_def")
    assert type(network) is TumourSegmentationNet
    for key in ("preprocessing", "postprocessing"):
        transforms = parser.get_parsed_content(key).transforms
        assert not any(isinstance(t, OUTPUT_WRITERS) for t in transforms), key
    # the shipped weights load strictly; the network's shapes match the metadata
    load_weights(network, stock_bundle / "models" / "model.pt")
    verify_net_in_out(net_id="network_def", meta_file=str(stock_bundle / "configs" / "metadata.json"),
                      config_file=str(stock_bundle / "configs" / "inference.json"), n=2, device="cpu")


def test_stock_preprocessing_loads_only_the_posted_image(stock_bundle):
    """BundleInferTask swaps every ``LoadImaged`` for ``LoadImageTensord``, which reads ``data[key]`` for each of its
    keys: a loader of a key a request does not carry (the optional brain mask) is a server error (HTTP 500), and
    a request carries one image. The brain mask step stays in the bundle's own segmentation config."""
    from monai.transforms import LoadImaged

    parser = _parser(stock_bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(stock_bundle)
    transforms = parser.get_parsed_content("preprocessing").transforms
    loaders = [t for t in transforms if isinstance(t, LoadImaged)]
    assert loaders and all(tuple(t.keys) == ("image",) for t in loaders), [t.keys for t in loaders]
    # the pipeline runs on a request's item: the image alone
    rng = np.random.default_rng(0)
    head = np.zeros((24, 28, 20), np.float32)
    head[4:20, 4:24, 4:16] = 100 + rng.random((16, 20, 12), dtype=np.float32)
    image = save_nifti(head, np.diag([2.0, 2.0, 2.0, 1.0]), stock_bundle.parent / "request.nii.gz")
    item = parser.get_parsed_content("preprocessing")({"image": image})
    assert item["image"].shape[0] == parser.get_parsed_content("num_channels")

    own = ConfigParser()
    own.read_config([str(CONFIGS / n) for n in ("inference.json", "joint.json", "inference_segmentation.json")])
    own_keys = [tuple(t.keys) for t in own.get_parsed_content("preprocessing").transforms if isinstance(t, LoadImaged)]
    assert ("brain_mask",) in own_keys  # the bundle's command keeps its brain_mask input


def test_stock_train_config_pairs_the_datastore_subjects(stock_bundle):
    parser = _parser(stock_bundle / "configs" / "train.json")
    assert all(k in parser for k in TRAIN_IDS)
    assert parser["resume"] is False and parser["val_interval"] == 1
    # BundleTrainTask's overrides: the datastore's {"image", "label"} subjects
    parser["train#dataset#data"] = SUBJECTS[:2]
    parser["validate#dataset#data"] = SUBJECTS[2:]
    train = parser.get_parsed_content("train#data")
    assert [(p["moving"], p["fixed"]) for p in train] == [("/d/s0.nii.gz", "/d/s1.nii.gz"),
                                                         ("/d/s1.nii.gz", "/d/s0.nii.gz")]
    assert train[0]["moving_tumour"] == "/d/s0_seg.nii.gz" and train[0]["fixed_tumour"] == "/d/s1_seg.nii.gz"
    val = parser.get_parsed_content("validate#data")
    assert [(p["moving"], p["fixed"]) for p in val] == [("/d/s0.nii.gz", "/d/s2.nii.gz"),
                                                       ("/d/s1.nii.gz", "/d/s2.nii.gz")]
    assert parser.get_parsed_content("train#dataloader#dataset#data") == train  # what the trainer iterates
    # no validation subject (val_split 0): validate on the training pairs
    parser["validate#dataset#data"] = []
    parser.parse()
    assert len(parser.get_parsed_content("validate#data")) == 2


def test_stock_export_of_the_shipped_tumour_model(tmp_path):
    """The default model of ``monailabel_app/stock_bundle.py``: T1c + FLAIR configs, metadata of 2 channels, and a
    training config that trains the same network."""
    from bundle.configs import TUMOUR_CONFIGS, read_config

    model = read_config(REPO_ROOT, TUMOUR_CONFIGS).get_parsed_content("ckpt_path")
    dest = export_stock_bundle(REPO_ROOT, tmp_path / "brain", model)
    infer = _parser(dest / "configs" / "inference.json")
    assert infer["num_channels"] == 2 and infer["brain_scaling"] is True and infer["pixdim"] == [2.0, 2.0, 2.0]
    infer["bundle_root"] = str(dest)
    load_weights(infer.get_parsed_content("network_def"), dest / "models" / "model.pt")
    meta = json.loads((dest / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 2 and list(image["channel_def"].values()) == ["T1c (skull-stripped)", "FLAIR (skull-stripped)"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "background", "1": "oedema", "2": "tumour core"}
    verify_net_in_out(net_id="network_def", meta_file=str(dest / "configs" / "metadata.json"),
                      config_file=str(dest / "configs" / "inference.json"), n=2, device="cpu")
    train = _parser(dest / "configs" / "train.json")
    train["bundle_root"] = str(dest)
    load_weights(train.get_parsed_content("network_def"), dest / "models" / "model.pt")  # what it trains, loads
    assert train["brain_scaling"] is True


def test_app_configs_follow_the_joint_model_it_runs(tmp_path):
    """The app's tumour task and train task build the network of the checkpoint they use: the shipped tumour model
    by default, a one-channel T1 joint model when ``--conf model`` is one; the newest existing checkpoint counts."""
    from monailabel_app.lib.bundle_config import AppSettings

    settings = AppSettings.from_conf(tmp_path, {})
    assert settings.model.name == "joint_tumour_regions_t1c_flair_2mm.pt"
    assert settings.joint_overlays("inference.json") == ["joint.json", "tumour.json"]
    assert settings.joint_overlays("train.json") == ["joint.json", "tumour.json"]
    t1 = AppSettings.from_conf(tmp_path, {"model": str(write_zero_checkpoint(tmp_path / "t1.pt"))})
    assert t1.joint_overlays("inference.json") == ["joint.json"] and t1.joint_overlays("train.json") == []
    assert settings.tumour_labels() == {"oedema": 1, "tumour core": 2} and t1.tumour_labels() == {"tumour": 1}
    settings.trained_model.parent.mkdir(parents=True)
    write_zero_checkpoint(settings.trained_model)  # a published one-channel model replaces the shipped one
    assert settings.joint_overlays("inference.json") == ["joint.json"]
    missing = AppSettings.from_conf(tmp_path / "other", {"model": str(tmp_path / "absent.pt")})
    with pytest.raises(FileNotFoundError, match="no joint-model checkpoint"):
        missing.joint_overlays("inference.json")


def test_app_settings_check_the_atlas_files(tmp_path):
    """``--conf atlas_image``/``atlas_label`` come together; ``atlas_brain_mask`` belongs to ``atlas_image``; every
    atlas file must exist, and the error names it."""
    from monailabel_app.lib.bundle_config import AppSettings

    files = {k: tmp_path / f"{k}.nii.gz" for k in ("atlas_image", "atlas_label", "atlas_brain_mask")}
    for f in files.values():
        f.write_bytes(b"")
    conf = {k: str(f) for k, f in files.items()}
    settings = AppSettings.from_conf(tmp_path, conf)
    assert (settings.atlas_image, settings.atlas_label, settings.atlas_brain_mask) == tuple(conf.values())
    assert AppSettings.from_conf(tmp_path, {}).atlas_brain_mask is None
    with pytest.raises(ValueError, match="give both --conf atlas_image and --conf atlas_label"):
        AppSettings.from_conf(tmp_path, {"atlas_image": conf["atlas_image"]})
    with pytest.raises(ValueError, match="atlas_brain_mask is the brain mask of --conf atlas_image"):
        AppSettings.from_conf(tmp_path, {"atlas_brain_mask": conf["atlas_brain_mask"]})
    with pytest.raises(FileNotFoundError, match="atlas file not found: .*absent_mask.nii.gz"):
        AppSettings.from_conf(tmp_path, {**conf, "atlas_brain_mask": str(tmp_path / "absent_mask.nii.gz")})


def test_stock_export_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_stock_bundle(REPO_ROOT, tmp_path / "brain", tmp_path / "missing.pt")
    assert not (tmp_path / "brain").exists()


def test_split_subjects_keeps_a_training_pair():
    subjects = [{"image": str(i)} for i in range(5)]
    train, val = split_subjects(subjects, 0.2)
    assert [s["image"] for s in train] == ["0", "1", "2", "3"] and [s["image"] for s in val] == ["4"]
    train, val = split_subjects(subjects[:2], 0.5)
    assert len(train) == 2 and val == []
    with pytest.raises(ValueError, match="at least 2 labelled images"):
        split_subjects(subjects[:1], 0.2)
    with pytest.raises(ValueError, match="val_split"):
        split_subjects(subjects, 1.0)


def _run_python(code: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_stand_in_is_used_only_when_torchvision_is_missing(tmp_path):
    result = _run_python(
        """
        import os, sys
        from monailabel_app.lib.compat import ensure_torchvision, FALLBACK_DIR
        assert ensure_torchvision(export_env=True) == "fallback"
        assert sys.path[-1] == str(FALLBACK_DIR) and os.environ["PYTHONPATH"].endswith(str(FALLBACK_DIR))
        from torchvision.utils import make_grid, save_image   # what monailabel.transform.post imports
        try:
            make_grid(None)
        except ModuleNotFoundError as e:
            assert "torchvision is not installed" in str(e)
        else:
            raise AssertionError("make_grid of the stand-in returned")
        import torchvision
        assert not hasattr(torchvision, "models")
        print("ok")
        """,
        pythonpath=str(REPO_ROOT),
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # a real torchvision (here a stand-in for one, first on the path) is used unchanged
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\n")
    result = _run_python(
        """
        import sys
        from monailabel_app.lib.compat import ensure_torchvision, FALLBACK_DIR
        assert ensure_torchvision() == "torchvision"
        assert str(FALLBACK_DIR) not in sys.path
        import torchvision
        assert torchvision.REAL
        print("ok")
        """,
        pythonpath=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]),
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert FALLBACK_DIR.is_dir()


def test_cli_launcher_binds_to_localhost_unless_told():
    """``monailabel_cli.py start_server`` without ``--host`` listens on 127.0.0.1 only (no authentication)."""
    spec = importlib.util.spec_from_file_location("monailabel_cli", REPO_ROOT / "monailabel_app" / "monailabel_cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.local_by_default(["start_server", "--app", "a"]) == ["start_server", "--app", "a", "--host", "127.0.0.1"]
    for given in (["--host", "0.0.0.0"], ["-i", "10.0.0.2"], ["--host=0.0.0.0"]):
        assert cli.local_by_default(["start_server", *given]) == ["start_server", *given]
    assert cli.local_by_default(["apps", "--download"]) == ["apps", "--download"]


def test_app_runs_a_conditioned_joint_model_at_the_weight_its_overrides_give(tmp_path):
    """``--conf model`` a λ-conditioned joint checkpoint: the app's configs gain ``joint_conditioned.json`` (found from
    its parameters), ``--conf overrides '{"regularisation_weight": 0.5}'`` reaches the registration's prepare_batch,
    and the segmentation task's configs load the checkpoint into the segmentation path."""
    import torch

    from bundle.configs import read_config
    from bundle.networks import ConditionedJointRegSegNet, TumourSegmentationNet
    from monailabel_app.lib.bundle_config import AppSettings

    torch.save(ConditionedJointRegSegNet(3, 2, half_res=True).state_dict(), tmp_path / "conditioned.pt")
    settings = AppSettings.from_conf(tmp_path, {"model": str(tmp_path / "conditioned.pt"),
                                                "overrides": '{"regularisation_weight": 0.5}'})
    overlays = settings.joint_overlays("inference.json")
    assert overlays == ["joint.json", "tumour.json", "tumour_whole.json", "joint_conditioned.json"]
    registration = read_config(settings.bundle_root, ["inference.json", *overlays], settings.overrides)
    assert registration.get_parsed_content("prepare_batch").regularisation_weight == 0.5
    segmentation = read_config(settings.bundle_root, settings.segmentation_configs(),
                               {**settings.overrides, "ckpt_path": str(tmp_path / "conditioned.pt"), "device": "$torch.device('cpu')"})
    assert isinstance(segmentation.get_parsed_content("network"), TumourSegmentationNet)
