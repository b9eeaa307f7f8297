"""The training recipe's pieces: present-class label Dice, label supervision in both losses, gradient clipping,
the resumable CSV training log, autocast on any device, and the label-supervision check."""

from __future__ import annotations

import csv

import pytest
import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp

from bundle.engines import AutocastInferer, GradientClipping, NonFiniteLossGuard, TrainingLog, read_training_log
from bundle.io import check_label_supervision
from bundle.losses import JointRegSegLoss, RegistrationLoss
from bundle.losses.registration import present_class_dice_loss


def pack_joint_output(ddf, seg_moving, seg_fixed):
    return torch.cat([ddf, seg_moving, seg_fixed], dim=1)  # the layout split_joint_output reads


WARP = Warp(mode="bilinear", padding_mode="border")


def _blocks(shape=(8, 8, 8), values=(1, 2)) -> torch.Tensor:
    """(1, 1, *shape) label map: one slab per value along the first axis, background elsewhere."""
    lab = torch.zeros(1, 1, *shape)
    step = shape[0] // (len(values) + 1)
    for i, v in enumerate(values):
        lab[..., i * step:(i + 1) * step, :, :] = v
    return lab


def test_present_class_dice_is_zero_for_identical_labels_and_ignores_absent_classes():
    lab = _blocks()
    ddf = torch.zeros(1, 3, 8, 8, 8)
    assert present_class_dice_loss(lab, lab, 57, ddf, WARP).item() == pytest.approx(0.0, abs=1e-5)
    # one of two present classes fully wrong: loss 0.5 whatever num_classes is (absent classes do not dilute)
    moved = lab.clone()
    moved[moved == 2] = 3
    for num_classes in (4, 57):
        assert present_class_dice_loss(moved, lab, num_classes, ddf, WARP).item() == pytest.approx(2 / 3, abs=1e-4)


def test_present_class_dice_background_only_pair_is_zero_and_bad_values_raise():
    empty = torch.zeros(1, 1, 8, 8, 8)
    ddf = torch.zeros(1, 3, 8, 8, 8)
    assert present_class_dice_loss(empty, empty, 3, ddf, WARP).item() == 0.0
    with pytest.raises(ValueError, match="label_values|remap"):
        present_class_dice_loss(_blocks(values=(5,)), empty, 3, ddf, WARP)


@pytest.mark.parametrize("downsample", (1, 2))
def test_present_class_dice_follows_the_field(downsample):
    """A moving label shifted by 2 voxels: the DDF that undoes the shift scores better than zero."""
    fixed = _blocks((16, 16, 16))
    moving = torch.roll(fixed, shifts=2, dims=2)
    zero = torch.zeros(1, 3, 16, 16, 16)
    shift = zero.clone()
    shift[:, 0] = 2.0  # pull-back: warped(x) = moving(x + 2)
    wrong = present_class_dice_loss(moving, fixed, 3, zero, WARP, downsample)
    right = present_class_dice_loss(moving, fixed, 3, shift, WARP, downsample)
    assert right.item() < 0.15 and right.item() < 0.5 * wrong.item()  # pooled borders are soft at 2


def _pair(shape=(16, 16, 16)):
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, *shape, generator=g)
    lab = _blocks(shape)
    return {"moving": fixed.clone(), "fixed": fixed, "moving_label": torch.roll(lab, 2, 2), "fixed_label": lab}


def test_registration_loss_records_terms_and_uses_label_weight():
    target = _pair()
    ddf = torch.zeros(1, 3, 16, 16, 16)
    without = RegistrationLoss(label_weight=0.0)
    with_labels = RegistrationLoss(label_weight=2.0, num_classes=3, label_downsample=2)
    base = without(ddf, target)
    assert "label_dice" not in without.last_terms
    total = with_labels(ddf, target)
    assert set(with_labels.last_terms) == {"similarity", "smoothness", "label_dice"}
    assert total.item() == pytest.approx(base.item() + 2.0 * with_labels.last_terms["label_dice"], rel=1e-5)
    with pytest.raises(ValueError, match="label_downsample"):
        RegistrationLoss(label_downsample=0)


def test_joint_loss_honours_label_weight():
    """The joint model's loss adds gamma * label Dice (it used to accept label_weight and ignore it)."""
    target = _pair()
    ddf = torch.zeros(1, 3, 16, 16, 16)
    logits = torch.zeros(1, 2, 16, 16, 16)
    packed = pack_joint_output(ddf, logits, logits)
    plain = JointRegSegLoss(mask_source="none")
    supervised = JointRegSegLoss(mask_source="none", label_weight=0.5, label_weight_classes=3)
    base = plain(packed, target)
    total = supervised(packed, target)
    dice = supervised.last_terms["label_dice"]
    assert dice > 0.1
    assert total.item() == pytest.approx(base.item() + 0.5 * dice, rel=1e-5)
    # gradient reaches the field through the label term
    ddf.requires_grad_(True)
    supervised(pack_joint_output(ddf, logits, logits), target).backward()
    assert ddf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="label_weight_classes"):
        JointRegSegLoss(label_weight=1.0)


def test_check_label_supervision():
    pairs = [{"moving": "a", "fixed": "b"}, {"moving": "a", "fixed": "b", "moving_label": "x", "fixed_label": "y"}]
    assert check_label_supervision(pairs, 1.0) == 1
    assert check_label_supervision(pairs[:1], 0.0) == 0
    with pytest.raises(ValueError, match="no training pair has both"):
        check_label_supervision(pairs[:1], 0.5)


def _toy_trainer(clip: GradientClipping | None):
    net = torch.nn.Linear(4, 1)
    with torch.no_grad():
        net.weight.fill_(10.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        loss = (net(batch) ** 2).mean() * 1000
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        opt.step()
        return {"loss": loss.item()}

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    engine.network, engine.optimizer = net, opt
    if clip is not None:
        clip.attach(engine)
    return engine, net


def test_gradient_clipping_bounds_the_update():
    clip = GradientClipping(max_norm=1.0)
    engine, net = _toy_trainer(clip)
    before = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    engine.run([torch.ones(2, 4)], max_epochs=1)
    assert clip.last_norm > 1.0  # the norm before clipping is reported
    step = torch.nn.utils.parameters_to_vector(net.parameters()).detach() - before
    assert step.norm().item() == pytest.approx(0.1 * 1.0, rel=1e-3)  # SGD: lr * max_norm
    unclipped, net2 = _toy_trainer(None)
    before2 = torch.nn.utils.parameters_to_vector(net2.parameters()).detach().clone()
    unclipped.run([torch.ones(2, 4)], max_epochs=1)
    assert (torch.nn.utils.parameters_to_vector(net2.parameters()).detach() - before2).norm().item() > 1.0
    with pytest.raises(ValueError):
        GradientClipping(-1)


def test_training_log_rows_and_resumed_wall_time(tmp_path):
    path = tmp_path / "log" / "training_log.csv"

    class Terms:
        last_terms = {"similarity": -0.5, "smoothness": 0.1}

    for run in range(2):  # a second run appends and continues the wall time
        engine, _ = _toy_trainer(None)
        log = TrainingLog(path, interval=2, loss_function=Terms(), hardware="test machine")
        evaluator = Engine(lambda e, b: None)
        evaluator.state.metrics = {}

        @evaluator.on(__import__("ignite").engine.Events.STARTED)
        def _metrics(e):
            e.state.metrics = {"val_mean_dice": 0.5 + run, "val_folding_pct": 0.0}

        log.attach(engine, evaluator)
        engine.run([torch.ones(2, 4)] * 4, max_epochs=1)
        evaluator.run([0], max_epochs=1)
    train, val = read_training_log(path)
    assert [int(r["iteration"]) for r in train] == [2, 4, 2, 4]
    assert float(train[0]["similarity"]) == pytest.approx(-0.5) and train[0]["hardware"] == "test machine"
    assert [v["metrics"]["val_mean_dice"] for v in val] == [0.5, 1.5]
    walls = [float(r["wall_s"]) for r in csv.DictReader(open(path))]
    assert walls == sorted(walls)  # cumulative across the two runs
    train, val = read_training_log(path, latest=True)  # the second run rewrote iterations 2 and 4
    assert [int(r["iteration"]) for r in train] == [2, 4] and [v["metrics"]["val_mean_dice"] for v in val] == [1.5]
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="wall_s"):
        TrainingLog(path)


def test_read_training_log_latest_keeps_the_resumed_runs_rows(tmp_path):
    """A run killed at iteration 35 after its checkpoint at 20 resumes there: its rows 30 and 35 are superseded."""
    path = tmp_path / "training_log.csv"
    written = [("train", 10, 1.0), ("train", 20, 0.9), ("validation", 20, 0.5), ("train", 30, 0.8), ("train", 35, 0.7),
               ("train", 30, 0.6), ("train", 40, 0.5), ("validation", 40, 0.7)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TrainingLog.FIELDS)
        writer.writeheader()
        for wall, (kind, it, value) in enumerate(written):
            metrics = f"val_mean_dice={value}" if kind == "validation" else ""
            writer.writerow({"kind": kind, "iteration": it, "epoch": 1, "loss": "" if metrics else value,
                             "metrics": metrics, "wall_s": wall})
    train, val = read_training_log(path)
    assert [int(r["iteration"]) for r in train] == [10, 20, 30, 35, 30, 40]
    train, val = read_training_log(path, latest=True)
    assert [(int(r["iteration"]), float(r["loss"])) for r in train] == [(10, 1.0), (20, 0.9), (30, 0.6), (40, 0.5)]
    assert [(int(v["iteration"]), v["metrics"]["val_mean_dice"]) for v in val] == [(20, 0.5), (40, 0.7)]


@pytest.mark.parametrize("enabled", (True, False))
def test_autocast_inferer_runs_on_cpu_and_returns_float32(enabled):
    net = torch.nn.Conv3d(2, 3, 3, padding=1)
    x = torch.rand(1, 2, 8, 8, 8)
    out = AutocastInferer(enabled=enabled)(x, net)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 8, 8, 8)
    torch.testing.assert_close(out, net(x), atol=5e-2, rtol=5e-2)  # bfloat16 keeps ~3 significant digits


def _nan_trainer(guard, nan_at=(2,)):
    """A real MONAI SupervisedTrainer on 4 one-sample batches; the loss is NaN at the given iterations."""
    from monai.engines import SupervisedTrainer

    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    data = [{"image": torch.ones(1, 3), "label": torch.zeros(1, 1), "name": [f"pair{i}"]} for i in range(4)]

    def loss_fn(pred, target):
        loss = ((pred - target) ** 2).mean()
        return loss * float("nan") if trainer.state.iteration in nan_at else loss

    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=opt, loss_function=loss_fn, decollate=False)
    guard.attach(trainer)
    return trainer, net


def test_nonfinite_loss_guard_raises_naming_the_pair():
    trainer, _ = _nan_trainer(NonFiniteLossGuard("raise"))
    with pytest.raises(FloatingPointError, match=r"iteration 2 on name=\['pair1'\]"):
        trainer.run()


def test_nonfinite_loss_guard_skips_the_batch_without_moving_weights():
    guard = NonFiniteLossGuard("skip")
    trainer, net = _nan_trainer(guard, nan_at=(2,))
    snapshots = []
    trainer.add_event_handler(__import__("ignite").engine.Events.ITERATION_COMPLETED,
                              lambda e: snapshots.append(torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()))
    trainer.run()
    assert guard.skipped == 1 and len(snapshots) == 4
    assert torch.equal(snapshots[0], snapshots[1])  # the NaN batch (iteration 2) changed nothing, momentum included
    assert not torch.equal(snapshots[1], snapshots[2]) and all(torch.isfinite(s).all() for s in snapshots)
    with pytest.raises(ValueError):
        NonFiniteLossGuard("ignore")


def test_resume_from_a_checkpoint_without_the_scheduler_keeps_a_fresh_scheduler(tmp_path):
    """Checkpoints written before the LR scheduler was saved still resume (network, optimiser, trainer restored)."""
    from bundle.engines import ResumeFromLatest

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    trainer = Engine(lambda e, b: None)
    trainer.state.max_epochs, trainer.state.iteration, trainer.state.epoch, trainer.state.epoch_length = 5, 6, 3, 2
    with torch.no_grad():
        net.weight.fill_(0.5)
    torch.save({"network": net.state_dict(), "optimizer": opt.state_dict(), "trainer": trainer.state_dict()},
               tmp_path / "checkpoint_epoch=3.pt")
    fresh_net = torch.nn.Linear(2, 1)
    fresh_opt = torch.optim.Adam(fresh_net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1)
    resumed = Engine(lambda e, b: None)
    resumed.state.max_epochs = 10
    ResumeFromLatest(tmp_path, {"network": fresh_net, "optimizer": fresh_opt, "trainer": resumed,
                                "lr_scheduler": scheduler})(resumed)
    assert torch.equal(fresh_net.weight, net.weight) and resumed.state.iteration == 6
    assert scheduler.last_epoch == 0  # started afresh
