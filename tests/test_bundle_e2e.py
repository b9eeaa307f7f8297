"""End-to-end tests of the bundle commands on the embedded demo data set (built at run time, CPU).

``register_jobs`` adds every command to the session's job graph (``conftest.job_graph``, two at a time): a
1-epoch training run on the demo (which also builds the demo data), then resuming, the ``run`` alias,
evaluation, inference and multi-process (DDP) training, and independently the metadata/network checks and
the error cases on small synthetic volumes. Everything is written into pytest temporary folders.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.engines.training import read_training_log  # imported at collection: job threads import concurrently later
from conftest import (
    CONFIGS,
    REPO_ROOT,
    JobGraph,
    assert_summary_is_mean_of_pairs,
    check_outputs_on_grid,
    config,
    load_nifti,
    metric_lines,
    run,
    save_nifti,
    write_datalist,
    write_zero_checkpoint,
)

# a coarse network grid (the demo is at 3 mm): these tests check the plumbing, not the accuracy
PIXDIM = "[6.0,6.0,6.0]"
TRAIN_ARGS = ["--val_interval", "1", "--num_workers", "0", "--pixdim", PIXDIM]
# evaluation and inference load the best model that training wrote (the default ckpt_path)
BEST_CKPT = "model.pt"


def _train(bundle_root: Path, epochs: int, log: Path, command: str = "training", extra=()):
    return run(
        ["run", command, "--config_file", config("train.json"), "--bundle_root", bundle_root,
         "--max_epochs", epochs, *TRAIN_ARGS, *extra],
        log=log,
    )


def _infer(bundle_root: Path, out: Path, log: Path, datalist=None, ckpt=None, cwd=REPO_ROOT, extra=()):
    args = ["run", "inference", "--config_file", config("inference.json", "joint.json"), "--bundle_root", bundle_root,
            "--output_dir", out, "--pixdim", PIXDIM, *extra]
    args += ["--datalist", datalist] if datalist else []
    args += ["--ckpt_path", ckpt] if ckpt else []
    return run(args, cwd=cwd, log=log, timeout=180)


def _snapshot(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tiny_inputs(folder: Path) -> dict:
    """Small synthetic volumes for the error cases, a zero checkpoint and a garbage one."""
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = rng.random((32, 32, 32), dtype=np.float32)
    label = (image > 0.5).astype(np.uint8)
    files = {
        "image": save_nifti(image, affine, folder / "img.nii.gz"),
        "label": save_nifti(label, affine, folder / "img_seg.nii.gz"),
        "image2d": save_nifti(image[:, :, 0], affine, folder / "img2d.nii.gz"),
    }
    nan_image = image.copy()
    nan_image[3, 4, 5] = np.nan
    files["nan"] = save_nifti(nan_image, affine, folder / "img_nan.nii.gz")
    files["zero_ckpt"] = str(write_zero_checkpoint(folder / "zero.pt"))
    files["corrupt_ckpt"] = str(folder / "corrupt.pt")
    Path(files["corrupt_ckpt"]).write_bytes(np.random.default_rng(1).bytes(4096))
    files["missing"] = str(folder / "does_not_exist" / "img_missing.nii.gz")
    # a smooth blob and its label; the fixed label is the same physical label stored on a grid shifted by
    # 4 voxels (8 mm): array rolled by 4 voxels, origin moved back by 8 mm
    radius = np.linalg.norm(np.indices((32, 32, 32)) - 15.5, axis=0)
    blob_label = (radius < 7).astype(np.uint8)
    files["blob"] = save_nifti(np.exp(-(radius / 9) ** 2).astype(np.float32), affine, folder / "blob.nii.gz")
    files["blob_label"] = save_nifti(blob_label, affine, folder / "blob_seg.nii.gz")
    shifted = affine.copy()
    shifted[:3, 3] -= 4 * affine[:3, 0]
    files["blob_label_shifted"] = save_nifti(
        np.roll(blob_label, 4, axis=0), shifted, folder / "blob_seg_shifted.nii.gz"
    )
    files["zero_train_ckpt"] = str(write_zero_checkpoint(folder / "zero_train.pt", config_files=("train.json",)))

    def pair(moving, fixed, name):
        return {"moving": files[moving], "fixed": files[fixed], "moving_label": files["label"], "name": name}

    lists = {
        "good": [pair("image", "image", "ok")],
        "missing": [{**pair("image", "image", "x"), "fixed": files["missing"]}],
        "nan": [pair("nan", "image", "nan")],
        "2d3d": [{"moving": files["image2d"], "fixed": files["image"], "name": "dims"}],
    }
    sections = ("training", "validation", "testing")
    for key, pairs in lists.items():
        files[f"datalist_{key}"] = str(write_datalist(folder / f"datalist_{key}.json", pairs, sections))
    blob_pair = {"moving": files["blob"], "fixed": files["blob"], "moving_label": files["blob_label"],
                 "fixed_label": files["blob_label_shifted"], "name": "blob"}
    files["datalist_blob"] = str(write_datalist(folder / "datalist_blob.json", [blob_pair], sections))
    train_pair = {"moving": files["image"], "fixed": files["blob"], "moving_label": files["label"],
                  "fixed_label": files["blob_label"], "name": "noise_to_blob"}
    files["datalist_train"] = str(write_datalist(folder / "datalist_train.json", [train_pair], sections))
    return files


def register_jobs(graph: JobGraph, tmp_path_factory) -> dict:
    """Add this module's commands to the session's job graph (see ``conftest.job_graph``)."""
    root = tmp_path_factory.mktemp("e2e")
    bundle_root, logs, tiny = root / "bundle", root / "logs", root / "tiny"

    def train():
        result = _train(bundle_root, 1, logs / "train.log").check()
        return result, _snapshot(bundle_root / "models", root / "models_epoch1")

    def resume():
        graph.result("train")
        result = _train(bundle_root, 2, logs / "resume.log")
        return result, _snapshot(bundle_root / "models", root / "models_epoch2") if result.returncode == 0 else None

    def alias():
        graph.result("resume")
        # the checkpoint is at epoch 2 already: `run run` must resume it and stop without training
        return _train(bundle_root, 2, logs / "alias.log", command="run", extra=["--cache_rate", "0"])

    def evaluate():
        _, models = graph.result("train")
        return run(
            ["run", "evaluating", "--config_file", config("train.json", "evaluate.json"), "--bundle_root",
             bundle_root, "--output_dir", root / "eval", "--ckpt_path", models / BEST_CKPT, "--num_workers", "0",
             "--pixdim", PIXDIM],
            log=logs / "evaluate.log",
        )

    def infer():
        _, models = graph.result("train")
        return _infer(bundle_root, root / "infer", logs / "infer.log", ckpt=models / BEST_CKPT)

    def ddp():
        graph.result("train")
        ddp_root = root / "ddp"
        ddp_root.mkdir()
        shutil.copytree(bundle_root / "demo_data", ddp_root / "demo_data")
        args = ["--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training", "--config_file",
                config("train.json", "multi_gpu_train.json"), "--bundle_root", ddp_root, "--max_epochs", "1",
                *TRAIN_ARGS]
        return run(args, module="torch.distributed.run", log=logs / "ddp.log"), ddp_root

    def cohort():
        """The trained model on the demo's 4 test pairs, without pre-alignment: 2 processes
        (``multi_process_inference.json``, gloo on CPU), 1 process, and 1 process loading the next pair in a
        DataLoader worker (``num_workers`` 1), for an exact comparison."""
        _, models = graph.result("train")
        common = ["--bundle_root", bundle_root, "--pixdim", PIXDIM, "--ckpt_path", models / BEST_CKPT, "--prealign", "none"]
        two = run(["--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "inference", "--config_file",
                   config("inference.json", "joint.json", "multi_process_inference.json"), "--output_dir", root / "cohort2", *common],
                  module="torch.distributed.run", log=logs / "cohort2.log", timeout=300)
        one = run(["run", "inference", "--config_file", config("inference.json", "joint.json"), "--output_dir", root / "cohort1", *common],
                  log=logs / "cohort1.log", timeout=300)
        worker = run(["run", "inference", "--config_file", config("inference.json", "joint.json"), "--output_dir", root / "cohort1w",
                      "--num_workers", "1", *common], log=logs / "cohort1w.log", timeout=300)
        return two, one, worker

    def recipe():
        """The campaign recipe (configs/campaign.json) for 2 + 2 iterations, stopped and resumed."""
        graph.result("train")
        recipe_root = root / "recipe"
        recipe_root.mkdir()
        shutil.copytree(bundle_root / "demo_data", recipe_root / "demo_data")

        def args(epochs):
            return ["run", "training", "--config_file", config("train.json", "registration_only.json", "campaign.json"),
                    "--bundle_root", recipe_root, "--max_epochs", epochs, "--epoch_length", "2", "--log_interval", "1",
                    "--num_workers", "0", "--cache_rate", "0", "--pixdim", PIXDIM, "--num_threads", "1"]

        first = run(args(1), log=logs / "recipe1.log")
        second = run(args(2), log=logs / "recipe2.log") if first.returncode == 0 else None
        return first, second, recipe_root

    def overlay_training(name, overlays, register_args):
        """2 iterations of registration-only training with the given overlays, then ``brainreg register`` with the
        trained model (the CLI must recognise the checkpoint and add the overlays itself)."""
        def job():
            graph.result("train")
            work = root / name
            work.mkdir()
            shutil.copytree(bundle_root / "demo_data", work / "demo_data")
            trained = run(["run", "training", "--config_file", config("train.json", "registration_only.json", *overlays),
                           "--bundle_root", work, "--max_epochs", "1", "--epoch_length", "2", "--log_interval", "1",
                           "--num_workers", "0", "--cache_rate", "0", "--pixdim", PIXDIM, "--num_threads", "1",
                           "--val_interval", "1"],
                          log=logs / f"{name}_train.log")
            if trained.returncode != 0:
                return trained, None, work
            pair = json.loads((work / "demo_data" / "datalist.json").read_text())["testing"][0]
            registered = run(["register", work / "demo_data" / pair["moving"], work / "demo_data" / pair["fixed"],
                              "--out", work / "registered", "--model", work / "models" / "model.pt", "--device", "cpu",
                              "--prealign", "none", "--pixdim", PIXDIM, *register_args],
                             module="bundle", timeout=300, log=logs / f"{name}_register.log")
            return trained, registered, work

        return job

    def autoreg_search():
        """2 iterations of the architecture search overlay (two operations, to stay small): α stepped on the
        validation pairs, the genotype written, the α optimizer in the checkpoint."""
        graph.result("train")
        work = root / "autoreg"
        work.mkdir()
        shutil.copytree(bundle_root / "demo_data", work / "demo_data")
        return run(["run", "training", "--config_file", config("train.json", "registration_only.json", "autoreg_search.json"),
                    "--bundle_root", work, "--max_epochs", "1", "--epoch_length", "2", "--log_interval", "1",
                    "--num_workers", "0", "--cache_rate", "0", "--pixdim", PIXDIM, "--num_threads", "1",
                    "--val_interval", "1", "--search_operations", "['conv_1','conv_3']"],
                   log=logs / "autoreg_train.log"), work

    def autoreg_searched():
        """2 iterations of the searched network trained from the search's genotype.json (the campaign's
        registration_t1_autoreg, small), and the same command naming a genotype file that is not there."""
        _, search = graph.result("autoreg")
        work = root / "autoreg_searched"
        work.mkdir()
        shutil.copytree(bundle_root / "demo_data", work / "demo_data")
        args = ["run", "training", "--config_file", config("train.json", "registration_only.json", "autoreg_searched.json"),
                "--bundle_root", work, "--max_epochs", "1", "--epoch_length", "2", "--log_interval", "1",
                "--num_workers", "0", "--cache_rate", "0", "--pixdim", PIXDIM, "--num_threads", "1", "--val_interval", "1"]
        trained = run([*args, "--genotype_file", search / "genotype.json"], log=logs / "autoreg_searched_train.log")
        missing = run([*args, "--genotype_file", work / "nowhere" / "genotype.json"],
                      log=logs / "autoreg_searched_missing.log")
        return trained, missing, search, work

    def fails(name, datalist_key, ckpt_key="zero_ckpt", ckpt=None, extra=()):
        def job():
            files = graph.result("tiny")
            return _infer(root / "err", root / "err" / name, logs / f"{name}.log",
                          datalist=files[f"datalist_{datalist_key}"], ckpt=ckpt or files[ckpt_key], extra=extra)

        return job

    def other_cwd():
        files = graph.result("tiny")
        elsewhere = root / "elsewhere"
        elsewhere.mkdir()
        out = root / "other_cwd_out"
        return _infer(root / "err", out, logs / "other_cwd.log", datalist=files["datalist_good"],
                      ckpt=files["zero_ckpt"], cwd=elsewhere), out

    def train_without_tumours():
        files = graph.result("tiny")
        return _train(root / "tiny_train", 1, logs / "train_no_tumour.log",
                      extra=["--datalist", files["datalist_train"], "--implant_lesions", "False"])

    def evaluate_label_grid():
        files = graph.result("tiny")
        out = root / "eval_blob"
        return run(
            ["run", "evaluating", "--config_file", config("train.json", "evaluate.json"), "--bundle_root",
             root / "err", "--output_dir", out, "--datalist", files["datalist_blob"], "--ckpt_path",
             files["zero_train_ckpt"], "--num_workers", "0", "--pixdim", PIXDIM],
            log=logs / "eval_blob.log",
        ), out

    # priorities: the long chain train -> resume -> alias first, the cheap independent commands last
    graph.add("train", train, priority=85)
    # built here, in the main thread: ConfigParser (the zero checkpoints) iterates sys.modules and races with
    # imports in other threads ("dictionary changed size during iteration"); job threads run commands only
    tiny_files = _tiny_inputs(tiny)
    graph.add("tiny", lambda: tiny_files, priority=55)
    graph.add("resume", resume, ["train"], priority=80)
    graph.add("alias", alias, ["resume"], priority=70)
    graph.add("ddp", ddp, ["train"], priority=60)
    graph.add("recipe", recipe, ["train"], priority=50)
    graph.add("conditioned", overlay_training("conditioned", ["regularisation_conditioned.json"],
                                              ["--regularisation_weight", "0.5"]), ["train"], priority=30)
    graph.add("probabilistic", overlay_training("probabilistic", ["probabilistic_features.json",
                                                                  "probabilistic_features_train.json"], []),
              ["train"], priority=30)
    graph.add("autoreg", autoreg_search, ["train"], priority=30)
    graph.add("autoreg_searched", autoreg_searched, ["autoreg"], priority=30)
    graph.add("cohort", cohort, ["train"], priority=45)
    graph.add("evaluate", evaluate, ["train"], priority=40)
    graph.add("infer", infer, ["train"], priority=40)
    graph.add("verify_net", lambda: run(
        ["verify_net_in_out", "network_def", "--config_file", "configs/inference.json", "--meta_file",
         "configs/metadata.json"], log=logs / "verify_net.log", timeout=180))
    graph.add("verify_meta", lambda: run(
        ["verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "configs/metadata_schema.json"],
        log=logs / "verify_meta.log", timeout=180))
    graph.add("err_missing_ckpt", fails("missing_ckpt", "good", ckpt=str(root / "nowhere" / "model.pt")), ["tiny"])
    graph.add("err_corrupt_ckpt", fails("corrupt_ckpt", "good", ckpt_key="corrupt_ckpt"), ["tiny"])
    graph.add("err_missing_file", fails("missing_file", "missing"), ["tiny"])
    graph.add("err_nan", fails("nan", "nan"), ["tiny"])
    graph.add("err_nan_worker", fails("nan_worker", "nan", extra=["--num_workers", "1"]), ["tiny"])
    graph.add("err_2d3d", fails("2d3d", "2d3d"), ["tiny"])
    graph.add("other_cwd", other_cwd, ["tiny"])
    graph.add("train_no_tumour", train_without_tumours, ["tiny"], priority=20)
    graph.add("eval_blob", evaluate_label_grid, ["tiny"], priority=20)
    return {"graph": graph, "root": root, "bundle_root": bundle_root}


@pytest.fixture(scope="module")
def e2e(job_graph):
    return job_graph.context[__name__]


def _job(e2e, name):
    return e2e["graph"].result(name)


def _demo_datalist(bundle_root: Path) -> tuple[Path, dict]:
    path = bundle_root / "demo_data" / "datalist.json"
    assert path.is_file(), f"training without --datalist should build the demo in {path.parent}"
    return path, json.loads(path.read_text())


def _state_dict(path: Path) -> dict:
    """The network weights of a checkpoint (plain state dict or under ``network``), tensors only."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(ckpt, dict), f"{path} holds a {type(ckpt).__name__}"
    state = ckpt["network"] if isinstance(ckpt.get("network"), dict) else ckpt
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _key_metric(log: str, epoch: int) -> tuple[str, float]:
    """(name, value) of the key metric that the validation of ``epoch`` logged."""
    names = re.findall(r"Key metric: (\S+) best value", log)
    assert names, "no key metric in the training log"
    match = re.search(rf"Epoch\[{epoch}\] Metrics -- .*?\b{re.escape(names[0])}: ([-0-9.eE+na]+)", log)
    assert match, f"no {names[0]} logged for epoch {epoch}"
    return names[0], float(match.group(1))


# ----------------------------------------------------------------------------------------------- training


def test_campaign_recipe_trains_logs_and_resumes(e2e):
    """train.json + registration_only.json + campaign.json: crop, 2 mm-style recipe, label Dice, clipping, CSV log,
    and a second run that resumes from the first one's checkpoint and continues its log and wall time."""
    first, second, root = _job(e2e, "recipe")
    first.check()
    second.check()
    assert "resuming from" in second.output
    train, val = read_training_log(root / "eval" / "training_log.csv")  # output_dir, beside the TensorBoard logs
    assert [int(r["iteration"]) for r in train] == [1, 2, 3, 4]
    assert [int(v["iteration"]) for v in val] == [2, 4]
    assert all(r["similarity"] and r["smoothness"] and r["label_dice"] and r["grad_norm"] for r in train)
    # the demo's labels overlap at about 0.68 before registration (see test_evaluating_writes_metrics); a pipeline
    # comparing them on mismatched grids falls far below, and 4 iterations do not move far from it
    assert all(0.5 < v["metrics"]["val_mean_dice"] < 0.95 and v["metrics"]["val_folding_pct"] < 1.0 for v in val), val
    walls = [float(r["wall_s"]) for r in train]
    assert walls == sorted(walls) and "CPU" in train[0]["hardware"]
    ckpt = torch.load(root / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert {"network", "optimizer", "trainer", "lr_scheduler"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 4
    assert {k.split(".")[0] for k in ckpt["network"]} == {"encoder", "decoder", "head"}  # the registration U-Net


@pytest.mark.parametrize("name, prefix", [("conditioned", "film_"), ("probabilistic", "gaussians.")])
def test_training_and_registering_with_the_regularisation_and_feature_overlays(e2e, name, prefix):
    """regularisation_conditioned.json (λ drawn per pair in training, a fixed λ in validation) and the probabilistic
    features (KL term added to the loss) train through the real engines; the CLI then recognises the checkpoint
    (FiLM / Gaussian weights) and registers a demo pair with it."""
    trained, registered, work = _job(e2e, name)
    trained.check()
    state = _state_dict(work / "models" / "model.pt")
    assert any(k.startswith(prefix) for k in state), sorted(state)[:5]
    train, val = read_training_log(work / "eval" / "training_log.csv")
    assert [int(r["iteration"]) for r in train] == [1, 2] and all(math.isfinite(float(r["loss"])) for r in train)
    assert val and 0.0 < val[-1]["metrics"]["val_mean_dice"] <= 1.0
    registered.check()
    assert {"warped.nii.gz", "ddf.nii.gz"} <= {p.name for p in (work / "registered").iterdir()}


def test_training_writes_loadable_checkpoints(e2e):
    result, models = _job(e2e, "train")
    _demo_datalist(e2e["bundle_root"])
    assert re.search(r"Epoch: 1/1, Iter: \d+/\d+", result.output), "no training iteration was logged"
    assert "Key metric:" in result.output, "the validation (val_interval 1) did not run"
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=1.pt").is_file(), sorted(models.iterdir())
    best = _state_dict(models / "model.pt")
    ckpt = torch.load(models / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    assert {"network", "optimizer", "trainer"} <= set(ckpt), sorted(ckpt)
    assert best and set(best) == set(ckpt["network"])
    assert all(torch.equal(best[k], ckpt["network"][k]) for k in best), "model.pt != the only epoch's weights"
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_best_model_loads_into_inference_network(e2e):
    from monai.bundle import ConfigParser

    from bundle.engines import load_weights

    _, models = _job(e2e, "train")
    assert (models / "model.pt").is_file()
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "joint.json")])  # train.json trains the joint model
    load_weights(parser.get_parsed_content("network_def"), models / "model.pt")


def test_training_resumes_from_latest_checkpoint(e2e):
    result, models = _job(e2e, "resume")
    result.check()
    assert "resuming from" in result.output and "checkpoint_epoch=1.pt" in result.output, result.tail()
    epochs = {int(e) for e in re.findall(r"Epoch: (\d+)/2, Iter:", result.output)}
    assert epochs == {2}, f"the resumed run should train epoch 2 only, logged epochs {sorted(epochs)}"
    assert (models / "checkpoint_epoch=2.pt").is_file()
    trainer = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)["trainer"]
    assert trainer["iteration"] == 2 * trainer["epoch_length"], trainer


def test_resume_keeps_best_model(e2e):
    """After a resumed run, model.pt holds the weights of the epoch with the best key metric (a strict improvement
    is needed to replace it), so a resumed run never overwrites a better model with a worse one."""
    first, epoch1 = _job(e2e, "train")
    resumed, epoch2 = _job(e2e, "resume")
    resumed.check()
    name, m1 = _key_metric(first.output, 1)
    _, m2 = _key_metric(resumed.output, 2)
    best = _state_dict(epoch2 / "model.pt")
    winner = epoch2 / "checkpoint_epoch=2.pt" if m2 > m1 else epoch1 / "model.pt"
    expected = _state_dict(winner)
    same = best.keys() == expected.keys() and all(torch.equal(best[k], expected[k]) for k in best)
    assert same, f"model.pt after resuming ({name}: epoch 1 {m1}, epoch 2 {m2}) is not the weights of {winner.name}"


def test_run_alias_runs_training(e2e):
    result = _job(e2e, "alias").check()
    assert "resuming from" in result.output and "checkpoint_epoch=2.pt" in result.output, result.tail()
    assert not re.search(r"Epoch: \d+/2, Iter:", result.output), "nothing was left to train"


def test_multi_process_training(e2e):
    result, ddp_root = _job(e2e, "ddp")
    result.check()
    _, datalist = _demo_datalist(ddp_root)
    per_rank = math.ceil(len(datalist["training"]) / 2)
    assert re.search(rf"Epoch: 1/1, Iter: {per_rank}/{per_rank}\b", result.output), (
        f"each of the 2 ranks should run {per_rank} iterations\n{result.tail()}"
    )
    assert (ddp_root / "models" / "model.pt").is_file() and (ddp_root / "models" / "checkpoint_epoch=1.pt").is_file()
    state = _state_dict(ddp_root / "models" / "model.pt")
    assert state and not any(k.startswith("module.") for k in state), "DDP wrapper prefix in the saved weights"


# --------------------------------------------------------------------------------------------- evaluation


def test_evaluating_writes_metrics(e2e):
    result = _job(e2e, "evaluate").check()
    out = e2e["root"] / "eval"
    summary = out / "metrics.csv"
    assert summary.is_file(), f"no metrics.csv in {out}: {sorted(p.name for p in out.glob('*'))}\n{result.tail()}"
    values = metric_lines(summary)
    dice = {k: v for k, v in values.items() if "dice" in k}
    assert dice, f"no Dice metric in {summary}: {values}"
    _, datalist = _demo_datalist(e2e["bundle_root"])
    after = assert_summary_is_mean_of_pairs(out, "val_mean_dice")
    before = assert_summary_is_mean_of_pairs(out, "dice_before")
    assert sorted(after) == sorted(before) == sorted(p["name"] for p in datalist["testing"])
    # Dice before registration is symmetric: the reversed healthy pair compares the same two label maps
    healthy = [p["name"] for p in datalist["testing"] if "lesion" not in p["name"]]
    assert len(healthy) == 2
    np.testing.assert_allclose(before[healthy[0]], before[healthy[1]], atol=1e-6)
    # the demo subjects are smooth warps of one template: their grey/white matter overlap clearly but not fully;
    # a pipeline comparing labels on mismatched grids or orientations falls far below
    assert 0.5 < values["dice_before"] < 0.95, values
    assert values["val_mean_dice"] >= values["dice_before"] - 0.02, values  # registration does not make it worse
    raw = sorted(out.glob("*dice*_raw.csv"))
    assert raw, sorted(p.name for p in out.glob("*"))
    text = raw[0].read_text()
    for pair in datalist["testing"]:
        assert pair["name"] in text, f"pair {pair['name']} missing from {raw[0].name}"


# ---------------------------------------------------------------------------------------------- inference


def test_inference_outputs_on_fixed_grid(e2e):
    _job(e2e, "infer").check()
    path, datalist = _demo_datalist(e2e["bundle_root"])
    for pair in datalist["testing"]:
        fixed, affine = load_nifti(path.parent / pair["fixed"])
        out = check_outputs_on_grid(e2e["root"] / "infer" / pair["name"], fixed.shape, affine)
        jac = out["jacobian_det"]
        assert np.isfinite(out["ddf"]).all() and np.isfinite(jac).all()
        assert (jac > 0).mean() > 0.99, f"{pair['name']}: {(jac <= 0).mean():.2%} folded voxels"
        assert set(np.unique(out["warped_label"]).tolist()) <= {0, 1, 2}
        assert np.isfinite(out["warped"]).all()


def test_two_process_cohort_inference_equals_one_process(e2e):
    """``torchrun --nproc_per_node 2 ... multi_process_inference.json`` shards the pairs (DistributedSampler, no
    padding): every pair written once, each output equal to the single-process one."""
    two, one, worker = _job(e2e, "cohort")
    two.check()
    one.check()
    worker.check()
    _, datalist = _demo_datalist(e2e["bundle_root"])
    names = sorted(p["name"] for p in datalist["testing"])
    assert sorted(p.name for p in (e2e["root"] / "cohort2").iterdir() if p.is_dir()) == names
    for name in names:
        files = sorted(p.name for p in (e2e["root"] / "cohort1" / name).iterdir())
        assert sorted(p.name for p in (e2e["root"] / "cohort2" / name).iterdir()) == files
        assert ".bundle_outputs.json" in files  # the committed folder's list of outputs
        for f in files:
            if f == ".bundle_outputs.json":
                assert (e2e["root"] / "cohort1" / name / f).read_text() == (e2e["root"] / "cohort2" / name / f).read_text()
                continue
            a = np.asarray(nib.load(e2e["root"] / "cohort1" / name / f).dataobj)
            b = np.asarray(nib.load(e2e["root"] / "cohort2" / name / f).dataobj)
            np.testing.assert_allclose(b, a, atol=1e-4, err_msg=f"{name}/{f}")
            w = np.asarray(nib.load(e2e["root"] / "cohort1w" / name / f).dataobj)
            np.testing.assert_array_equal(w, a, err_msg=f"{name}/{f} (num_workers 1)")


def test_architecture_search_steps_alpha_and_writes_the_genotype(e2e):
    result, work = _job(e2e, "autoreg")
    result.check()
    record = json.loads((work / "genotype.json").read_text())
    assert record["iteration"] == 2 and len(record["genotype"]) == 11
    assert set(record["genotype"]) <= {"conv_1", "conv_3"}
    weights = record["operation_weights"]
    assert len(weights) == 11 and all(abs(sum(w.values()) - 1) < 1e-5 for w in weights)
    assert any(abs(w["conv_1"] - 0.5) > 1e-6 for w in weights), "α never moved"
    checkpoint = torch.load(sorted((work / "models").glob("checkpoint*.pt"))[-1], map_location="cpu", weights_only=True)
    assert "architecture_search" in checkpoint and checkpoint["architecture_search"]["optimizer"]["state"]


def test_the_searched_network_trains_from_the_genotype_and_loads_for_inference(e2e):
    """``configs/autoreg_searched.json``: the search's genotype.json builds the network that trains, its best
    weights load into the inference pipeline's network built from the same file; a missing file is named."""
    from bundle.configs import read_config
    from bundle.engines import load_weights

    trained, missing, search, work = _job(e2e, "autoreg_searched")
    trained.check()
    genotype = json.loads((search / "genotype.json").read_text())["genotype"]
    parser = read_config(REPO_ROOT, ["inference.json", "registration_only.json", "autoreg_searched.json"],
                         {"genotype_file": str(search / "genotype.json")})
    network = parser.get_parsed_content("network_def")
    assert network.genotype == genotype
    load_weights(network, work / "models" / "model.pt")
    last = missing.check_fails("no genotype file").output.strip().splitlines()[-1]
    assert str(work / "nowhere" / "genotype.json") in last and "no genotype file" in last, missing.tail()


def test_inference_missing_checkpoint(e2e):
    _job(e2e, "err_missing_ckpt").check_fails(str(e2e["root"] / "nowhere" / "model.pt"))


def test_inference_corrupt_checkpoint(e2e):
    _job(e2e, "err_corrupt_ckpt").check_fails("unreadable", "corrupt.pt")


def test_inference_missing_input_file(e2e):
    _job(e2e, "err_missing_file").check_fails("img_missing.nii.gz")


def test_inference_nan_image(e2e):
    result = _job(e2e, "err_nan").check_fails("img_nan.nii.gz", "NaN")
    last = result.output.strip().splitlines()[-1]  # the message naming the file is the last line, once
    assert last.startswith("error: ") and "img_nan.nii.gz" in last and "NaN" in last, result.tail()
    assert "Traceback" not in result.output and result.output.count("1 NaN/Inf voxels") == 1, result.tail()


def test_inference_nan_image_found_in_a_dataloader_worker(e2e):
    """With ``num_workers`` 1 the error is raised in the worker process: still one last line naming the file."""
    result = _job(e2e, "err_nan_worker").check_fails("img_nan.nii.gz", "NaN")
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "img_nan.nii.gz" in last and "NaN" in last, result.tail()
    assert "Traceback" not in result.output, result.tail()


def test_inference_2d_with_3d(e2e):
    result = _job(e2e, "err_2d3d").check_fails("img2d.nii.gz")
    assert re.search(r"2D\b.*\b3D|3D\b.*\b2D", result.output), result.tail()


def test_inference_from_other_cwd(e2e):
    """Absolute config paths and ``--bundle_root`` from another folder (needs ``pip install -e .``, see README)."""
    result, out = _job(e2e, "other_cwd")
    result.check()
    fixed, affine = load_nifti(_job(e2e, "tiny")["image"])
    check_outputs_on_grid(out / "ok", fixed.shape, affine)


def test_evaluation_fixed_label_placed_by_its_affine(e2e):
    result, out = _job(e2e, "eval_blob")
    result.require()
    dice = {k: v for k, v in metric_lines(out / "metrics.csv").items() if "dice" in k and "before" not in k}
    assert dice and all(v > 0.99 for v in dice.values()), f"same image and label, zero DDF: Dice {dice}"


def test_training_without_tumour_labels_has_a_loss(e2e):
    result = _job(e2e, "train_no_tumour").require()
    losses = [float(v) for v in re.findall(r"train_loss: ([-+0-9.eE]+)", result.output)]
    if not losses:
        pytest.fail(f"no training loss logged\n{result.tail()}")
    assert any(v != 0 for v in losses), f"every training loss is 0: {losses}"


# ----------------------------------------------------------------------------------------------- checks


def test_verify_net_in_out(e2e):
    result = _job(e2e, "verify_net").check()
    assert "verified" in result.output, result.tail()


def test_verify_metadata(e2e):
    result = _job(e2e, "verify_meta").check()
    assert "verified" in result.output, result.tail()
    assert (CONFIGS / "metadata_schema.json").is_file()


def test_training_starts_from_init_ckpt_weights(tmp_path):
    """``init_ckpt`` (fine-tuning): the training network starts from those weights; a missing file is named."""
    from monai.bundle import ConfigParser

    def training_network(init_ckpt):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.json"))
        parser.update({"init_ckpt": init_ckpt, "device": "$torch.device('cpu')"})
        return parser.get_parsed_content("initial_network")

    torch.manual_seed(1)
    source = training_network(None)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    torch.manual_seed(2)
    fresh, loaded = training_network(None), training_network(str(tmp_path / "weights.pt"))
    key = next(k for k, v in source.state_dict().items() if v.dtype.is_floating_point and v.abs().sum() > 0)
    assert not torch.equal(fresh.state_dict()[key], source.state_dict()[key])
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    with pytest.raises(RuntimeError) as error:  # MONAI's config error, caused by ours naming the file
        training_network(str(tmp_path / "absent.pt"))
    assert isinstance(error.value.__cause__, FileNotFoundError) and "absent.pt" in str(error.value.__cause__)
