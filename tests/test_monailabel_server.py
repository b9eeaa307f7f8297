"""A real MONAI Label server on 127.0.0.1 serving this bundle: the app's tasks, then the stock ``monaibundle`` route.

Needs MONAI Label (``bash monailabel_app/install.sh ENV``, see docs/monailabel.md; CI runs this file in that
environment in its own step) and ../shared/data; skips cleanly without either. The servers run as
subprocesses in their own process groups, talk only to 127.0.0.1, and are stopped (SIGTERM, then SIGKILL
after a bounded wait) at the end of the module.

Data: BraTS 2013 (CC BY-NC-SA 3.0). The held-out case pat0001 (FLAIR, T1c as distributed, 240x240x155 at
1 mm) is posted for inference; four other cases, their FLAIR and expert tumour labels resampled to 3 mm to
keep the test short, are the datastore's labelled studies for training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from scipy.ndimage import distance_transform_edt

from bundle.engines import load_weights
from conftest import CONFIGS, REPO_ROOT, SHARED_DATA, bundle_env, dice, run, write_zero_checkpoint

monailabel = pytest.importorskip("monailabel", reason="MONAI Label is not installed (monailabel_app/install.sh)")
requests = pytest.importorskip("requests")
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402  (a MONAI Label dependency)

BRATS = SHARED_DATA / "brats2013"
HELD_OUT = BRATS / "test" / "brats_2013_pat0001_1"
STUDIES = ["test/brats_2013_pat0002_1", "validation/brats_2013_pat0003_1", "validation/brats_2013_pat0004_1",
           "train/brats_2013_pat0005_1"]  # sorted by id: the last one validates (val_split 0.25)
FLAIR, TUMOUR, BRAIN = "Flair_subtrMeanDivStd.nii.gz", "OTMultiClass.nii.gz", "brainmask.nii.gz"
BRAIN_TAG = "brain"  # the datastore label tag of the brain mask of STUDIES[0] (a request's brain_mask_tag)

PIXDIM = [4.0, 4.0, 4.0]  # network grid of the joint model's commands here, set explicitly (what its weights are trained at)
TRAIN_EPOCHS = 4  # 6 ordered pairs of 3 training subjects per epoch
STARTUP_S, INFER_S, TRAIN_S, STOP_S = 240, 600, 900, 30

pytestmark = pytest.mark.skipif(not HELD_OUT.is_dir(), reason="../shared/data (BraTS 2013) not available")


class Server:
    """``python -m monailabel.main start_server`` (or another launcher) on 127.0.0.1, in its own process group."""

    def __init__(self, launcher: list[str], app: Path, studies: Path, conf: dict, log: Path):
        with socket.socket() as s:  # a free port on the loopback interface
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [*launcher, "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
                "--port", str(self.port)]
        for key, value in conf.items():
            args += ["--conf", key, value]
        env = {**bundle_env(threads=2), "MONAI_LABEL_SESSION_PATH": str(log.parent / "sessions")}
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy: traffic stays on 127.0.0.1
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=str(log.parent), env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"MONAI Label server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if self.http.get(f"{self.url}/info/", timeout=10).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"MONAI Label server not ready after {STARTUP_S} s:\n{self.tail()}")

    def tail(self, n: int = 6000) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-n:]

    def info(self) -> dict:
        return self.http.get(f"{self.url}/info/", timeout=30).json()

    def infer(self, task: str, image: Path | None = None, image_id: str = "", params: dict | None = None):
        """POST ``/infer/<task>`` (a file upload, or a datastore id); returns ``(label array, affine, params)``."""
        files = {"file": (image.name, image.read_bytes())} if image else None
        response = self.http.post(f"{self.url}/infer/{task}", params={"image": image_id, "output": "all"},
                                  data={"params": json.dumps(params or {})}, files=files, timeout=INFER_S)
        assert response.status_code == 200, f"{task}: HTTP {response.status_code} {response.text[:2000]}\n{self.tail()}"
        parts = {p.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0]: p
                 for p in MultipartDecoder.from_response(response).parts}
        label_file = self.log.parent / f"{task}_{time.monotonic_ns()}.nii.gz"
        label_file.write_bytes(parts[b"image"].content)
        label = nib.load(str(label_file))
        return np.asarray(label.dataobj), label.affine, json.loads(parts[b"params"].text)

    def train(self, task: str, params: dict) -> dict:
        """POST ``/train/<task>`` and wait (bounded) for the task; returns its final status."""
        response = self.http.post(f"{self.url}/train/{task}", json=params, timeout=60)
        assert response.status_code == 200, f"train {task}: HTTP {response.status_code} {response.text[:2000]}"
        deadline = time.monotonic() + TRAIN_S
        while time.monotonic() < deadline:
            status = self.http.get(f"{self.url}/train/", timeout=30).json()
            if status.get("status") in ("DONE", "ERROR", "STOPPED"):
                assert status["status"] == "DONE", f"training {status['status']}:\n{self.tail()}"
                return status
            time.sleep(3)
        self.http.delete(f"{self.url}/train/", timeout=60)
        pytest.fail(f"training did not finish in {TRAIN_S} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_S)
        self._log_file.close()


def _resample(path: Path, out: Path, order: int, dtype) -> None:
    from nibabel.processing import resample_to_output

    image = nib.load(str(path))
    resampled = resample_to_output(image, (3.0, 3.0, 3.0), order=order)
    nib.save(nib.Nifti1Image(np.asarray(resampled.dataobj).astype(dtype), resampled.affine), str(out))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("monailabel")


@pytest.fixture(scope="module")
def studies(work) -> Path:
    """Datastore: four labelled BraTS cases (FLAIR, expert labels 0-4) at 3 mm."""
    folder = work / "studies"
    (folder / "labels" / "final").mkdir(parents=True)
    for case in STUDIES:
        name = Path(case).name
        _resample(BRATS / case / FLAIR, folder / f"{name}.nii.gz", order=1, dtype=np.float32)
        _resample(BRATS / case / TUMOUR, folder / "labels" / "final" / f"{name}.nii.gz", order=0, dtype=np.uint8)
    _half_brain_mask(STUDIES[0], folder)
    return folder


def _half_brain_mask(case: str, folder: Path) -> None:
    """``labels/brain/<case>``: the case's brain mask without the half (first voxel axis) that holds most of its
    tumour, so that applying it visibly changes what the models see."""
    name = Path(case).name
    mask_file = folder / "labels" / BRAIN_TAG / f"{name}.nii.gz"
    mask_file.parent.mkdir(parents=True)
    _resample(BRATS / case / BRAIN, mask_file, order=0, dtype=np.float32)  # BraTS stores 1 as 0.99999997
    mask = nib.load(str(mask_file))
    tumour = np.asarray(nib.load(str(folder / "labels" / "final" / f"{name}.nii.gz")).dataobj) > 0
    inside = np.asarray(mask.dataobj) > 0.5
    middle = int(np.mean(np.nonzero(inside)[0]))
    tumour_first_half = tumour[:middle].sum() > tumour[middle:].sum()
    if tumour_first_half:
        inside[:middle] = False
    else:
        inside[middle:] = False
    nib.save(nib.Nifti1Image(inside.astype(np.uint8), mask.affine), str(mask_file))


@pytest.fixture(scope="module")
def app_server(work, studies):
    """This repository's app (a copy, so that its models and logs stay out of the checkout): untrained joint weights
    (tumour task), the shipped registration model (atlas task)."""
    app = work / "app"
    ignore = shutil.ignore_patterns("model", "logs", "bin", "__pycache__")
    shutil.copytree(REPO_ROOT / "monailabel_app", app, ignore=ignore)
    conf = {
        "bundle_root": str(REPO_ROOT),
        "model": str(write_zero_checkpoint(work / "untrained.pt")),
        # no grid override: the tumour task runs the joint configs' 4 mm grid, the atlas task the shipped
        # registration model on its own 2 mm grid
        "overrides": json.dumps({"demo_dir": str(work / "demo_data")}),
    }
    server = Server([sys.executable, "-m", "monailabel.main"], app, studies, conf, work / "app_server.log")
    server.app = app
    yield server
    server.stop()


def test_info_lists_the_app_tasks(app_server):
    info = app_server.info()
    assert info["models"]["tumour_segmentation"]["labels"] == {"tumour": 1}
    assert info["models"]["atlas_registration"]["labels"] == {"grey matter": 1, "white matter": 2}
    assert set(info["trainers"]) == {"joint_model"}
    assert info["datastore"]["total"] == len(STUDIES) and info["datastore"]["completed"] == len(STUDIES)


def test_tumour_segmentation_returns_a_label_map_on_the_image_grid(app_server):
    image = nib.load(str(HELD_OUT / FLAIR))
    label, affine, params = app_server.infer("tumour_segmentation", HELD_OUT / FLAIR)
    assert label.shape == image.shape == (240, 240, 155)
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)
    assert set(np.unique(label)) <= {0, 1}
    assert params["label_names"] == {"tumour": 1}


def test_atlas_registration_puts_the_demo_atlas_on_the_brain(app_server, work):
    """The embedded demo's atlas (MNI-based, grey/white matter) registered onto a real BraTS T1c (SRI24 space)."""
    image = nib.load(str(HELD_OUT / "T1c_subtrMeanDivStd.nii.gz"))
    label, affine, params = app_server.infer("atlas_registration", HELD_OUT / "T1c_subtrMeanDivStd.nii.gz")
    assert label.shape == image.shape
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)
    assert set(np.unique(label)) == {0, 1, 2}
    brain = np.asarray(nib.load(str(HELD_OUT / BRAIN)).dataobj) > 0
    tissue = label > 0
    assert dice(tissue, brain, [True]) > 0.8, "propagated grey+white matter does not cover the brain mask"
    assert (tissue & brain).sum() / tissue.sum() > 0.85, "propagated labels outside the brain"
    assert params["atlas_image"] == str(work / "demo_data" / "subject_00.nii.gz")
    assert 0.0 <= params["folding_percent"] < 1.0


def test_atlas_registration_with_a_datastore_atlas(app_server, studies):
    """``atlas`` = a labelled datastore image: registered onto itself, its own labels must come back."""
    case = Path(STUDIES[0]).name
    label, _, params = app_server.infer("atlas_registration", image_id=case, params={"atlas": case})
    own = np.asarray(nib.load(str(studies / "labels" / "final" / f"{case}.nii.gz")).dataobj)
    assert label.shape == own.shape
    assert set(np.unique(label)) <= set(np.unique(own))
    assert dice(label > 0, own > 0, [True]) > 0.9
    assert params["atlas_label"] == str(studies / "labels" / "final" / f"{case}.nii.gz")


def test_atlas_registration_takes_the_brain_masks_of_the_image_and_the_atlas_from_the_datastore(app_server, studies):
    """``brain_mask_tag``: the image's label of that tag is its brain mask, and the datastore atlas's (here the same
    case) is the atlas's; both are named in the result, and a case registered onto itself keeps its labels."""
    case = Path(STUDIES[0]).name
    label, _, params = app_server.infer("atlas_registration", image_id=case,
                                        params={"atlas": case, "brain_mask_tag": BRAIN_TAG})
    mask = str(studies / "labels" / BRAIN_TAG / f"{case}.nii.gz")
    assert params["fixed_brain_mask"] == params["moving_brain_mask"] == mask
    own = np.asarray(nib.load(str(studies / "labels" / "final" / f"{case}.nii.gz")).dataobj)
    assert dice(label > 0, own > 0, [True]) > 0.9


def test_atlas_pair_takes_the_configured_atlas_brain_mask():
    """A ``--conf`` atlas with ``atlas_brain_mask``: the mask becomes the moving image's brain mask and is named in
    the result; a datastore atlas (``ATLAS_KEY``) keeps the mask the app found for it, and the demo atlas has none."""
    from monailabel_app.lib.infers.atlas_registration import ATLAS_KEY, AtlasPaird

    configured = AtlasPaird(lambda: ("atlas.nii.gz", "atlas_seg.nii.gz", "atlas_brain.nii.gz"))({"image": "img.nii.gz"})
    assert (configured["fixed"], configured["moving"], configured["moving_label"]) == ("img.nii.gz", "atlas.nii.gz", "atlas_seg.nii.gz")
    assert configured["moving_brain_mask"] == configured["result"]["moving_brain_mask"] == "atlas_brain.nii.gz"
    demo = AtlasPaird(lambda: ("demo.nii.gz", "demo_seg.nii.gz", None))({"image": "img.nii.gz"})
    assert "moving_brain_mask" not in demo and "moving_brain_mask" not in demo["result"]
    chosen = AtlasPaird(lambda: ("atlas.nii.gz", "atlas_seg.nii.gz", "atlas_brain.nii.gz"))(
        {"image": "img.nii.gz", ATLAS_KEY: ("case.nii.gz", "case_seg.nii.gz"), "moving_brain_mask": "case_brain.nii.gz"})
    assert chosen["moving"] == "case.nii.gz" and chosen["result"]["moving_brain_mask"] == "case_brain.nii.gz"


def test_bad_requests_are_answered_4xx_with_the_reason(app_server, studies, tmp_path):
    """Unknown model or image, a server path outside the datastore, an atlas without a label, a blank image:
    4xx with the reason (not 500), and the server keeps serving."""
    def post(task, image_id="", params=None, upload=None):
        files = {"file": (upload.name, upload.read_bytes())} if upload else None
        return app_server.http.post(f"{app_server.url}/infer/{task}", params={"image": image_id, "output": "all"},
                                    data={"params": json.dumps(params or {})}, files=files, timeout=INFER_S)

    case = Path(STUDIES[0]).name
    response = post("no_such_model", image_id=case)
    assert response.status_code == 404 and "unknown model 'no_such_model'" in response.text, response.text
    response = post("tumour_segmentation", image_id="no_such_image")
    assert response.status_code == 404 and "unknown image 'no_such_image'" in response.text, response.text
    outside = tmp_path / "outside.nii.gz"  # a readable image elsewhere on the server is not an input
    outside.write_bytes((studies / f"{case}.nii.gz").read_bytes())
    response = post("tumour_segmentation", image_id=str(outside))
    assert response.status_code == 404 and "unknown image" in response.text, response.text
    response = post("atlas_registration", image_id=case, params={"atlas": "no_such_atlas"})
    assert response.status_code == 400 and "has no final label" in response.text, response.text
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(blank))
    response = post("tumour_segmentation", upload=blank)
    assert response.status_code == 400 and "constant" in response.text, response.text
    # brain masks: a tag the image has no label of, an upload (no labels), a mask path given by the client
    response = post("tumour_segmentation", image_id=case, params={"brain_mask_tag": "no_such_tag"})
    assert response.status_code == 400 and "has no label of that tag" in response.text, response.text
    response = post("atlas_registration", upload=studies / f"{case}.nii.gz", params={"brain_mask_tag": BRAIN_TAG})
    assert response.status_code == 400 and "an uploaded image has no labels" in response.text, response.text
    response = post("atlas_registration", image_id=case, params={"fixed_brain_mask": str(outside)})
    assert response.status_code == 400 and "fixed_brain_mask: not request parameters" in response.text, response.text
    assert app_server.info()["models"]  # still serving


@pytest.fixture(scope="module")
def trained(app_server) -> Path:
    """The app's train task on the datastore; returns the model it published."""
    status = app_server.train("joint_model", {"max_epochs": TRAIN_EPOCHS, "val_split": 0.25, "pretrained": False,
                                             "device": "cpu"})
    model = app_server.app / "model" / "trained_model.pt"
    assert model.is_file(), f"no published model after training {status}"
    return model


@pytest.fixture(scope="module")
def trained_segmentation(app_server, trained):
    return app_server.infer("tumour_segmentation", HELD_OUT / FLAIR)


def test_trained_model_segments_the_held_out_tumour(trained_segmentation):
    """After a short training (24 iterations at 4 mm) the tumour is found, and where the experts drew it."""
    label, _, _ = trained_segmentation
    truth = np.asarray(nib.load(str(HELD_OUT / TUMOUR)).dataobj) > 0
    tumour = label == 1
    assert tumour.sum() > 0, "no tumour found in a case with a large tumour"
    near_truth = distance_transform_edt(~truth) <= 10.0  # 1 mm voxels: within 10 mm of the expert tumour
    assert (tumour & near_truth).sum() / tumour.sum() > 0.9, "predicted tumour away from the expert tumour"
    assert dice(tumour, truth, [True]) > 0.25


def test_app_segmentation_equals_the_bundle_command(trained, trained_segmentation, work):
    """Same weights, same image: MONAI Label's answer is the bundle's ``inference_segmentation.json`` output."""
    datalist = work / "segment.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(HELD_OUT / FLAIR), "name": "pat0001"}]}))
    run(["run", "inference", "--config_file", f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'joint.json'}','{CONFIGS / 'inference_segmentation.json'}']",
         "--bundle_root", str(work / "bundle_cmd"), "--datalist", str(datalist), "--ckpt_path", str(trained),
         "--pixdim", str(PIXDIM), "--output_dir", str(work / "bundle_cmd")], timeout=600).check()
    expected = np.asarray(nib.load(str(work / "bundle_cmd" / "pat0001" / "seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(trained_segmentation[0], expected)


def test_app_segmentation_with_a_brain_mask_label_equals_the_bundle_command(app_server, trained, studies, work):
    """``brain_mask_tag`` on a datastore image: MONAI Label's answer is the bundle command's with that mask
    (``brain_mask`` of ``inference_segmentation.json``), and the tumour in the masked-out half is gone."""
    case = Path(STUDIES[0]).name
    mask_file = studies / "labels" / BRAIN_TAG / f"{case}.nii.gz"
    masked, _, _ = app_server.infer("tumour_segmentation", image_id=case, params={"brain_mask_tag": BRAIN_TAG})
    unmasked, _, _ = app_server.infer("tumour_segmentation", image_id=case)
    datalist = work / "segment_masked.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(studies / f"{case}.nii.gz"), "brain_mask": str(mask_file),
                                                 "name": case}]}))
    out = work / "bundle_cmd_masked"
    run(["run", "inference", "--config_file", f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'joint.json'}','{CONFIGS / 'inference_segmentation.json'}']",
         "--bundle_root", str(out), "--datalist", str(datalist), "--ckpt_path", str(trained),
         "--pixdim", str(PIXDIM), "--output_dir", str(out)], timeout=600).check()
    np.testing.assert_array_equal(masked, np.asarray(nib.load(str(out / case / "seg.nii.gz")).dataobj))
    outside = np.asarray(nib.load(str(mask_file)).dataobj) == 0
    assert (unmasked[outside] == 1).sum() > (masked[outside] == 1).sum(), "the brain mask changed nothing"


@pytest.fixture(scope="module")
def stock_server(work, studies, trained):
    """MONAI Label's own ``monaibundle`` app with this bundle laid out under its model/ folder."""
    apps = work / "stock"
    subprocess.run([sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                    "--output", str(apps)], check=True, capture_output=True, timeout=120, env=bundle_env())
    bundle_dir = apps / "monaibundle" / "model" / "brain_tumour_segmentation"
    subprocess.run([sys.executable, str(REPO_ROOT / "monailabel_app" / "stock_bundle.py"), str(bundle_dir),
                    "--model", str(trained), "--overrides", json.dumps({"pixdim": PIXDIM})],
                   check=True, capture_output=True, timeout=120, env=bundle_env())
    conf = {"models": "brain_tumour_segmentation", "zoo_source": "local"}  # local bundle, no model-zoo lookup
    launcher = [sys.executable, str(REPO_ROOT / "monailabel_app" / "monailabel_cli.py")]
    server = Server(launcher, apps / "monaibundle", studies, conf, work / "stock_server.log")
    server.bundle_dir = bundle_dir
    yield server
    server.stop()


def test_stock_bundle_infer_task_matches_the_app(stock_server, trained_segmentation):
    info = stock_server.info()
    assert info["models"]["brain_tumour_segmentation"]["labels"] == {"tumour": 1}
    assert "brain_tumour_segmentation" in info["trainers"]
    label, affine, params = stock_server.infer("brain_tumour_segmentation", HELD_OUT / FLAIR)
    app_label, app_affine, _ = trained_segmentation
    assert label.shape == app_label.shape
    np.testing.assert_allclose(affine, app_affine, atol=1e-4)
    np.testing.assert_array_equal(label.astype(np.uint8), app_label)  # BundleInferTask loaded our weights
    assert params["label_names"] == {"tumour": 1}


def test_stock_bundle_train_task_runs_the_bundle_training(stock_server):
    model = stock_server.bundle_dir / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    stock_server.train("brain_tumour_segmentation", {"max_epochs": 1, "val_split": 0.25, "multi_gpu": False,
                                                      "device": "cpu"})
    assert model.stat().st_mtime_ns > before, "BundleTrainTask did not write a new models/model.pt"
    parser = ConfigParser()
    parser.read_config(str(stock_server.bundle_dir / "configs" / "inference.json"))
    load_weights(parser.get_parsed_content("network_def"), model)  # a readable checkpoint of the network
