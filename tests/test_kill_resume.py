"""Training killed at random points resumes from the newest complete checkpoint and ends exactly as an
uninterrupted seeded run; a non-finite loss stops the run naming the pair (the last good checkpoint intact) or
skips the batch.

The training runs are real processes killed with SIGKILL. They are forked from this (pre-imported) test
process rather than started as ``python -m monai.bundle`` commands: importing torch, MONAI and the bundle takes
~13 s per process on the busy 2-core CI machine, which would dominate the five runs of the kill test. A forked
child runs ``monai.bundle.run("training", ...)`` exactly as the command does, with one torch thread (more
OpenMP threads after a fork can hang when the parent has used OpenMP), its output in a log file.

The recipe is tiny and deterministic: 3 training pairs and 1 validation pair of the demo at 16 mm (16 voxels a
side), 3 iterations per epoch, validation and a checkpoint every epoch, ``seed`` 0, one thread, and a scheduler
with patience 0 so that its state matters after a resume.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.data.demo import build_demo_dataset
from bundle.engines import AtomicCheckpointSaver, ResumableEarlyStopHandler, read_training_log
from conftest import CONFIGS, REPO_ROOT

EPOCHS = 4
TRAIN_PAIRS, VAL_PAIRS = ("s00_to_s01", "s01_to_s02", "s02_to_s03"), ("s04_to_s05",)
POISONED = "s01_to_s02"  # the pair whose moving image the NaN tests turn into NaN (after the input checks)
OVERRIDES = {
    "max_epochs": EPOCHS, "val_interval": 1, "num_workers": 0, "num_threads": 1, "pixdim": [16.0, 16.0, 16.0],
    "log_interval": 1, "progress_bar": False, "learning_rate": 0.002, "lr_scheduler#patience": 0,
}
# appended to the training pre-processing: the poisoned pair's moving image becomes NaN in every epoch
POISON = (
    "$@preprocessing_transforms + @network_grid_transforms + @train#augmentation + [monai.transforms.Lambda("
    f"lambda d: dict(d, moving=d['moving'] * float('nan')) if d['name'] == '{POISONED}' else d), "
    "monai.transforms.EnsureTyped(keys=@all_keys, allow_missing_keys=True)]"
)
RUN_TIMEOUT = 300


def _child(root: Path, log: Path, overrides: dict) -> None:
    """The forked training process: ``monai.bundle run training`` with ``overrides``, output into ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # pytest had replaced the sys streams
    torch.set_num_threads(1)
    os.chdir(REPO_ROOT)
    from monai.bundle import run

    code = 1
    try:
        run("training", config_file=str(CONFIGS / "train.json"), bundle_root=str(root),
            datalist=str(root / "data" / "datalist.json"), **{**OVERRIDES, **overrides})
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        # multiprocessing's own exit (threading._shutdown) fails in a child forked from a non-main thread
        os._exit(code)


class Training:
    """One forked training run of the bundle in ``root``; ``kill_when`` polls a condition and SIGKILLs it."""

    _context = multiprocessing.get_context("fork")

    def __init__(self, root: Path, name: str, **overrides) -> None:
        self.root, self.log = root, root / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = self._context.Process(target=_child, args=(root, self.log, overrides), daemon=True)
        self.process.start()
        self.start = time.monotonic()

    def wait(self) -> int:
        self.process.join(RUN_TIMEOUT - (time.monotonic() - self.start))
        if self.process.is_alive():
            self.kill()
            pytest.fail(f"training timed out after {RUN_TIMEOUT} s: {self.tail()}")
        return self.process.exitcode

    def kill_when(self, condition, poll: float = 0.001, delay: float = 0.0) -> bool:
        """SIGKILL the run ``delay`` seconds after ``condition()`` holds; ``False`` if it ended first."""
        while self.process.is_alive() and time.monotonic() - self.start < RUN_TIMEOUT:
            if condition():
                time.sleep(delay)
                if not self.process.is_alive():
                    break
                self.kill()
                return True
            time.sleep(poll)
        self.wait()
        return False

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]


def _bundle_root(root: Path, demo_dir: Path) -> Path:
    """A bundle root with the demo files (built in ``demo_dir``) of the chosen pairs and their datalist."""
    demo = json.loads((demo_dir / "datalist.json").read_text())
    sections = {"training": TRAIN_PAIRS, "validation": VAL_PAIRS}
    datalist = {s: [p for p in demo[s] if p["name"] in names] for s, names in sections.items()}
    (root / "data").mkdir(parents=True)
    for pair in datalist["training"] + datalist["validation"]:
        for key, name in pair.items():
            if key != "name":
                shutil.copy2(demo_dir / name, root / "data" / name)
    (root / "data" / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return root


def _checkpoint(root: Path, epoch: int) -> Path:
    return root / "models" / f"checkpoint_epoch={epoch}.pt"


def _training_rows(root: Path, epoch: int) -> int:
    """How many training rows (one per iteration) the log holds for ``epoch``, from every run so far."""
    log = root / "eval" / "training_log.csv"
    return sum(r["epoch"] == str(epoch) for r in read_training_log(log)[0]) if log.is_file() else 0


def _kill_and_resume(root: Path) -> dict:
    """Kill the training at three points, each time starting it again with the same command; then let it end."""
    runs, kills = [], {}

    def start():
        runs.append(Training(root, f"run{len(runs) + 1}"))
        return runs[-1]

    # 1. mid-epoch 2, after the first checkpoint: the run resumes from checkpoint 1 and redoes epoch 2
    kills["epoch 2, iteration 2"] = start().kill_when(
        lambda: _checkpoint(root, 1).is_file() and _training_rows(root, 2) >= 1, poll=0.02)
    # 2. while checkpoint 3 is being written (its hidden temporary file exists), else right after it appears
    writing = []

    def saving_checkpoint_3():
        if any((root / "models").glob(".checkpoint_epoch=3.pt.*")):
            writing.append(True)
            return True
        return _checkpoint(root, 3).is_file()

    kills["writing checkpoint 3"] = start().kill_when(saving_checkpoint_3)
    kills["hit the write window"] = bool(writing)
    # 3. during the validation of epoch 4 (its training rows logged, checkpoint 4 not yet written)
    logged = _training_rows(root, 4)
    kills["validating epoch 4"] = start().kill_when(
        lambda: _training_rows(root, 4) >= logged + len(TRAIN_PAIRS), poll=0.02)
    final = start()
    return {"runs": runs, "kills": kills, "returncode": final.wait()}


RANDOM_KILLS = 10


def _kill_at_random_points(root: Path, seed: int = 0) -> dict:
    """Kill the training ``RANDOM_KILLS`` times at seeded random points, restarting it each time; then let it end.

    The points are sorted random iterations of the run (1-12: 4 epochs of 3), each plus a random 0-300 ms: a
    restarted run is killed that long after it logs an iteration at or past the point, which lands in training
    steps, validation, checkpoint writes and the next start-up alike, in every epoch.
    """
    rng = random.Random(seed)
    targets = sorted(rng.randint(1, EPOCHS * len(TRAIN_PAIRS)) for _ in range(RANDOM_KILLS))
    runs, points = [], []
    for target in targets:
        logged, delay = _all_training_rows(root), rng.uniform(0.0, 0.3)
        runs.append(Training(root, f"random{len(runs) + 1}"))
        reached = lambda: _all_training_rows(root) > logged and _last_iteration(root) >= target  # noqa: E731,B023
        if not runs[-1].kill_when(reached, poll=0.01, delay=delay):
            break  # the run ended before the point
        points.append((target, round(delay, 3), sorted(int(p.stem.split("=")[1]) for p in root.glob("models/checkpoint_*.pt"))))
    final = Training(root, "random_final")
    return {"runs": runs, "points": points, "returncode": final.wait(), "final": final}


def _all_training_rows(root: Path) -> int:
    log = root / "eval" / "training_log.csv"
    return len(read_training_log(log)[0]) if log.is_file() else 0


def _last_iteration(root: Path) -> int:
    return int(read_training_log(root / "eval" / "training_log.csv")[0][-1]["iteration"])


def _nan_run(root: Path, mode: str) -> Training:
    """One more epoch of the uninterrupted run (a copy), with the poisoned pair and ``nonfinite_loss=mode``."""
    run = Training(root, f"nan_{mode}", **{"max_epochs": EPOCHS + 1, "nonfinite_loss": mode,
                                           "train#preprocessing#transforms": POISON})
    run.wait()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run and then the two NaN runs on one thread, the kill-and-resume chain on the other."""
    base = tmp_path_factory.mktemp("kill_resume")
    demo_dir = base / "demo_data"  # built here: a clean clone has no demo_data/ until a command makes it
    build_demo_dataset(str(demo_dir))
    reference, killed = _bundle_root(base / "reference", demo_dir), _bundle_root(base / "killed", demo_dir)
    randomly_killed = _bundle_root(base / "randomly_killed", demo_dir)

    def reference_then_nan():
        uninterrupted = Training(reference, "uninterrupted")
        uninterrupted.wait()
        snapshots = {m: base / f"nan_{m}" for m in ("raise", "skip")}
        for folder in snapshots.values():
            shutil.copytree(reference, folder)
        return uninterrupted, {m: _nan_run(folder, m) for m, folder in snapshots.items()}, snapshots

    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        chain = pool.submit(lambda: (_kill_and_resume(killed), _kill_at_random_points(randomly_killed)))
        first = pool.submit(reference_then_nan)
        uninterrupted, nan_runs, nan_roots = first.result()
        chain, random_chain = chain.result()
    print(f"kill/resume and NaN runs: {time.monotonic() - start:.1f} s; kills {chain['kills']}; "
          f"random kill points (iteration reached, then delay s; checkpoints on disk) {random_chain['points']}")
    return {"reference": reference, "killed": killed, "uninterrupted": uninterrupted, "chain": chain,
            "nan": nan_runs, "nan_roots": nan_roots, "randomly_killed": randomly_killed, "random_chain": random_chain}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested checkpoint content (tensors bit for bit)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max()})"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _validation_by_epoch(root: Path) -> dict[int, dict]:
    """The validation metrics of each epoch (the last row of an epoch that was run again)."""
    return {int(v["epoch"]): v["metrics"] for v in read_training_log(root / "eval" / "training_log.csv")[1]}


def test_killed_training_resumes_to_the_uninterrupted_result(runs):
    reference, killed, chain = runs["reference"], runs["killed"], runs["chain"]
    assert runs["uninterrupted"].wait() == 0, runs["uninterrupted"].tail()
    first, *resumed, final = chain["runs"]
    assert chain["returncode"] == 0, final.tail()
    for point in ("epoch 2, iteration 2", "writing checkpoint 3", "validating epoch 4"):
        assert chain["kills"][point], f"the run ended before the kill point '{point}'"
    assert all(r.process.exitcode == -signal.SIGKILL for r in [first, *resumed])
    # a kill inside the write of checkpoint 3 (timing permitting) leaves checkpoint 2 the newest complete one
    sources = (1, 2 if chain["kills"]["hit the write window"] else 3, 3)
    for run, epoch in zip([*resumed, final], sources):
        assert f"resuming from {_checkpoint(killed, epoch)}" in run.output(), run.tail()
    assert not list((killed / "models").glob(".*.tmp")), "a killed save's temporary file was left behind"
    # the same weights, optimiser, scheduler, early-stopping and trainer state, and the same best model
    _assert_same(_load(_checkpoint(killed, EPOCHS)), _load(_checkpoint(reference, EPOCHS)), "checkpoint")
    _assert_same(_load(killed / "models" / "model.pt"), _load(reference / "models" / "model.pt"), "model.pt")
    expected = _validation_by_epoch(reference)
    assert sorted(expected) == list(range(1, EPOCHS + 1))
    for row in read_training_log(killed / "eval" / "training_log.csv")[1]:  # killed runs' validations included
        assert row["metrics"] == expected[int(row["epoch"])], f"epoch {row['epoch']}"
    train = {(r["iteration"], r["loss"]) for r in read_training_log(killed / "eval" / "training_log.csv")[0]}
    assert train == {(r["iteration"], r["loss"]) for r in read_training_log(reference / "eval" / "training_log.csv")[0]}


def test_training_killed_at_ten_random_points_ends_as_the_uninterrupted_run(runs):
    reference, killed, chain = runs["reference"], runs["randomly_killed"], runs["random_chain"]
    assert runs["uninterrupted"].wait() == 0, runs["uninterrupted"].tail()
    assert len(chain["points"]) == RANDOM_KILLS, f"training ended after {len(chain['points'])} kills: {chain['points']}"
    assert all(r.process.exitcode == -signal.SIGKILL for r in chain["runs"])
    assert chain["returncode"] == 0, chain["final"].tail()
    assert not list((killed / "models").glob(".*.tmp")), "a killed save's temporary file was left behind"
    _assert_same(_load(_checkpoint(killed, EPOCHS)), _load(_checkpoint(reference, EPOCHS)), "checkpoint")
    _assert_same(_load(killed / "models" / "model.pt"), _load(reference / "models" / "model.pt"), "model.pt")
    expected = _validation_by_epoch(reference)
    final = _validation_by_epoch(killed)
    assert final[EPOCHS] == expected[EPOCHS]  # the final validation metric, exactly (the done-when asks 1e-6)
    for row in read_training_log(killed / "eval" / "training_log.csv")[1]:
        assert row["metrics"] == expected[int(row["epoch"])], f"epoch {row['epoch']}"


def test_nan_loss_in_stop_mode_names_the_pair_and_keeps_the_last_checkpoint(runs):
    run, root = runs["nan"]["raise"], runs["nan_roots"]["raise"]
    assert run.process.exitcode not in (0, None), run.tail()
    output = run.output()
    pair = json.loads((root / "data" / "datalist.json").read_text())["training"][TRAIN_PAIRS.index(POISONED)]
    for fragment in ("FloatingPointError", "non-finite training loss", POISONED, pair["moving"], pair["fixed"],
                     "the last checkpoint on disk is the last good one"):
        assert fragment in output, f"{fragment!r} not in the output:\n{run.tail()}"
    assert sorted(p.name for p in (root / "models").iterdir()) == [f"checkpoint_epoch={EPOCHS}.pt", "model.pt"]
    for name in ("model.pt", f"checkpoint_epoch={EPOCHS}.pt"):
        assert (root / "models" / name).read_bytes() == (runs["reference"] / "models" / name).read_bytes(), name


def test_nan_loss_in_skip_mode_skips_the_batch_and_trains_on(runs):
    run, root = runs["nan"]["skip"], runs["nan_roots"]["skip"]
    assert run.process.exitcode == 0, run.tail()
    output = run.output()
    assert output.count("batch skipped") == 1 and POISONED in output, run.tail()
    assert (root / "models" / "model.pt").is_file()
    before, after = _load(_checkpoint(root, EPOCHS)), _load(_checkpoint(root, EPOCHS + 1))
    assert after["trainer"]["iteration"] == (EPOCHS + 1) * len(TRAIN_PAIRS)
    weights = after["network"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.isfinite(s).all() for p in after["optimizer"]["state"].values() for s in p.values())
    assert any(not torch.equal(weights[k], before["network"][k]) for k in weights), "the other pairs did not train"
    assert EPOCHS + 1 in _validation_by_epoch(root)


class _Flaky:
    """A checkpointed object whose state cannot be pickled once ``broken``: the save dies half-way, as if killed."""

    broken = False

    def state_dict(self):
        return {"fine": 1} if not self.broken else {"unpicklable": lambda: None}

    def load_state_dict(self, state):
        pass


def test_a_save_that_dies_keeps_the_previous_checkpoint(tmp_path):
    """MONAI's CheckpointSaver deletes the previous checkpoint and then writes the next in place; ours writes a
    temporary file, renames it, and only then deletes the previous one."""
    flaky, net = _Flaky(), torch.nn.Linear(2, 1)
    trainer = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"network": net, "flaky": flaky}, save_interval=1, n_saved=1).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(flaky, "broken", e.state.epoch == 3))
    with pytest.raises(Exception, match="pickle|lambda"):
        trainer.run([0], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]  # no temporary file either
    assert torch.equal(_load(tmp_path / "checkpoint_epoch=2.pt")["network"]["weight"], net.weight)


def test_early_stopping_state_survives_a_resume():
    def evaluator(score):
        engine = Engine(lambda e, b: None)
        engine.state.metrics, engine.state.key_metric_name = {"dice": score}, "dice"
        return engine

    def handler(trainer):
        return ResumableEarlyStopHandler(patience=3, score_function=lambda e: e.state.metrics["dice"], trainer=trainer)

    first = handler(Engine(lambda e, b: None))
    for score in (0.5, 0.4, 0.4):  # best 0.5, then 2 validations without improvement
        first(evaluator(score))
    trainer = Engine(lambda e, b: None)
    resumed = handler(trainer)
    resumed.load_state_dict(first.state_dict())
    resumed(evaluator(0.4))  # the third without improvement: the resumed run stops as the uninterrupted one
    assert trainer.should_terminate
