"""TorchScript export with ``python -m monai.bundle ckpt_export`` (traced) of both shipped architectures: the
registration model of ``configs/inference.json`` (λ-conditioned, half-resolution SVF; its input is
``cat([moving, fixed, λ map])``) and the joint model (``configs/joint.json``).

The exported models must reproduce the PyTorch outputs (DDF and, for the joint model, the tumour logits)
within ``ATOL`` on a real pair (OASIS, ``oasis/lapirn``; acknowledge OASIS) and on inputs of another shape
than the traced one (for the conditioned model, at another λ too: λ is data, not a traced constant). The
checkpoints have a random (non-zero) flow layer, so the DDFs are not trivially 0. The joint checkpoint is
written as training writes ``models/model.pt`` (weights under ``network`` with the best-metric record), hence
``--key_in_ckpt network``; the registration one is a plain state dict, as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser  # imported here, not in the job threads: concurrent first imports race

from bundle.engines import load_weights
from conftest import CONFIGS, SHARED_DATA, JobGraph, config, run

OASIS = SHARED_DATA / "oasis" / "lapirn" / "Data"
TRACE_SHAPE = (1, 2, 48, 48, 48)
OTHER_SHAPE = (1, 2, 32, 64, 48)
ATOL = 1e-5  # measured: identical (0.0) on this CPU; the tolerance covers other kernels/threads
MODELS = {
    "joint": ("inference.json", "joint.json"),
    "registration": ("inference.json",),
}
TRACE_WEIGHT, OTHER_WEIGHT = 0.173, 1.5  # λ of the conditioned model: traced at one, checked at another


def _inputs(model: str, images: torch.Tensor, weight: float) -> torch.Tensor:
    """The network input: the image pair, and for the conditioned model a λ channel."""
    if model == "joint":
        return images
    return torch.cat([images, torch.full_like(images[:, :1], weight)], dim=1)


def _network(config_files):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in config_files])
    return parser.get_parsed_content("network_def", instantiate=True)


def _write_checkpoint(model: str, path: Path) -> Path:
    """A fresh ``network_def`` of ``model`` with a random flow layer (DDFs of a few voxels), saved to ``path``."""
    torch.manual_seed(0)
    net = _network(MODELS[model])
    head = net.reg_head if model == "joint" else net.head
    with torch.no_grad():
        torch.nn.init.normal_(head.conv.weight, std=1.0)
        for name, p in net.named_parameters():  # FiLM starts as the identity: make λ matter
            if name.startswith("film_"):
                torch.nn.init.normal_(p, std=0.5)
    state = net.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network": state, "checkpointer": {"saved": []}} if model == "joint" else state, path)
    return path


def register_jobs(graph: JobGraph, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("torchscript")
    context = {"root": root}

    def export(model):
        # written here, in the main thread before the jobs start: MONAI's component locator iterates
        # sys.modules, which races with imports in other threads ("dictionary changed size during iteration")
        ckpt = _write_checkpoint(model, root / model / "model.pt")

        def job():
            args = [
                "ckpt_export", "network_def",
                "--filepath", root / model / "model.ts",
                "--ckpt_file", ckpt,
                "--meta_file", CONFIGS / "metadata.json",
                "--config_file", config(*MODELS[model]),
                "--use_trace", "True",
                "--input_shape", str([1, TRACE_SHAPE[1] + (model != "joint"), *TRACE_SHAPE[2:]]),
            ]
            if model == "joint":
                args += ["--key_in_ckpt", "network"]
            return run(args, timeout=300, log=root / model / "export.log")

        return job

    for model in MODELS:
        graph.add(f"torchscript_{model}", export(model))
    return context


@pytest.fixture(scope="module")
def exported(job_graph):
    return job_graph.context[__name__]


def _models(job_graph, exported, model):
    """``(eager network with the checkpoint, loaded TorchScript module, extra files)`` of one exported model."""
    job_graph.result(f"torchscript_{model}").check()
    folder = exported["root"] / model
    eager = load_weights(_network(MODELS[model]), folder / "model.pt").eval()
    extra = {"metadata.json": "", **{name: "" for name in MODELS[model]}}
    scripted = torch.jit.load(str(folder / "model.ts"), _extra_files=extra).eval()
    return eager, scripted, extra


def _oasis_pair() -> torch.Tensor:
    """``cat([moving, fixed])`` of OASIS A -> B at 4 mm (4x4x4 block means), padded to ``TRACE_SHAPE``."""
    files = [OASIS / f"image_{s}_160x192x144.nii.gz" for s in "AB"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"missing real data: {missing}")
    images = []
    for f in files:
        data = torch.as_tensor(np.asarray(nib.load(str(f)).dataobj, dtype=np.float32))[None, None]
        data = F.avg_pool3d(data, 4)  # 40 x 48 x 36
        pad = [s for t, d in zip(TRACE_SHAPE[:1:-1], data.shape[:1:-1]) for s in (0, t - d)]
        images.append(F.pad(data, pad))
    return torch.cat(images, dim=1)


@pytest.mark.parametrize("model", MODELS)
def test_export_reproduces_pytorch_on_a_real_pair(job_graph, exported, model):
    eager, scripted, extra = _models(job_graph, exported, model)
    x = _oasis_pair()
    assert tuple(x.shape) == TRACE_SHAPE
    x = _inputs(model, x, TRACE_WEIGHT)
    with torch.no_grad():
        expected, actual = eager(x), scripted(x)
    channels = 7 if model == "joint" else 3
    assert actual.shape == expected.shape == (1, channels, *TRACE_SHAPE[2:])
    assert expected[:, :3].abs().max() > 0.1, "the DDF should not be trivially zero"
    diff = (actual - expected).abs().max().item()
    print(f"{model}: real pair, max |TorchScript - PyTorch| = {diff:.2e} (DDF max {expected[:, :3].abs().max():.2f} voxels)")
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model", MODELS)
def test_export_runs_on_another_shape_and_embeds_the_bundle_files(job_graph, exported, model):
    eager, scripted, extra = _models(job_graph, exported, model)
    x = _inputs(model, torch.rand(OTHER_SHAPE, generator=torch.Generator().manual_seed(1)), OTHER_WEIGHT)
    with torch.no_grad():
        expected, actual = eager(x), scripted(x)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    if model == "registration":  # λ reaches the traced network as data: another λ, another field
        with torch.no_grad():
            other = _inputs(model, x[:, :2], TRACE_WEIGHT)
            assert (scripted(other) - actual).abs().max() > 1e-4
            torch.testing.assert_close(scripted(other), eager(other), atol=ATOL, rtol=0)
    # the metadata describes the default (registration) network; the joint overlay is embedded with its configs
    assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "bundle.networks.ConditionedRegistrationUNet"
    if model == "joint":
        assert json.loads(extra["joint.json"])["network_def"]["_target_"] == "bundle.networks.JointRegSegNet"

