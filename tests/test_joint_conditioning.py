"""The joint registration + tumour segmentation network conditioned on the regularisation weight (FiLM on its
registration decoder), its loss, its config overlay and its segmentation-only path (issue: regularisation chosen
by learning, joint model)."""

from __future__ import annotations

import pytest
import torch

from bundle.engines import RegistrationPrepareBatch, load_weights
from bundle.losses import JointRegSegLoss
from bundle.networks import ConditionedJointRegSegNet, JointRegSegNet, TumourSegmentationNet, split_joint_output

OPTIONS = {"spatial_dims": 3, "in_channels": 2, "half_res": True}


def _pair(shape=(16, 16, 16), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tumour = torch.zeros(batch, 1, *shape)
    tumour[..., 4:9, 5:10, 6:11] = 1
    return {"moving": torch.rand(batch, 2, *shape, generator=g), "fixed": torch.rand(batch, 2, *shape, generator=g),
            "moving_tumour": tumour, "fixed_tumour": tumour.roll(2, dims=2)}


def _plain_with_a_field(seed=0):
    torch.manual_seed(seed)
    plain = JointRegSegNet(**OPTIONS)
    torch.nn.init.normal_(plain.reg_head.conv.weight, std=0.1)  # a non-zero field
    return plain


def _trained_film(net):
    for film in net.film_decoder:
        torch.nn.init.normal_(film.linear.weight, std=0.5)
    return net


def test_plain_joint_weights_give_the_plain_network_for_every_weight():
    plain = _plain_with_a_field()
    conditioned = ConditionedJointRegSegNet(**OPTIONS)
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("embed.", "film_")) for k in missing)
    batch = _pair()
    expected = plain(torch.cat([batch["moving"], batch["fixed"]], 1))
    assert expected[:, :3].abs().max() > 1e-3
    for weight in (0.1, 1.0, 10.0):
        inputs, _ = RegistrationPrepareBatch(regularisation_weight=weight)(batch)
        assert inputs.shape[1] == 5
        torch.testing.assert_close(conditioned(inputs), expected)


def test_the_weight_changes_the_deformation_and_never_the_segmentation():
    net = _trained_film(ConditionedJointRegSegNet(**OPTIONS))
    torch.nn.init.normal_(net.reg_head.conv.weight, std=0.1)
    batch = _pair()
    with torch.no_grad():
        low, high = (split_joint_output(net(RegistrationPrepareBatch(regularisation_weight=w)(batch)[0]), 3, 2)
                     for w in (0.1, 10.0))
    assert (low["ddf"] - high["ddf"]).abs().max() > 1e-4
    torch.testing.assert_close(low["seg_moving"], high["seg_moving"])
    torch.testing.assert_close(low["seg_fixed"], high["seg_fixed"])
    # the segmentation path alone (what `brainreg segment` builds) gives the same logits
    segmenter = TumourSegmentationNet(**OPTIONS)
    segmenter.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(("embed.", "film_"))})
    with torch.no_grad():
        torch.testing.assert_close(segmenter(batch["fixed"]), low["seg_fixed"])


def test_images_without_the_weight_channel_or_a_bad_weight_are_explained():
    net = ConditionedJointRegSegNet(**OPTIONS)
    batch = _pair()
    with pytest.raises(ValueError, match="regularisation weight as an extra input channel"):
        net(RegistrationPrepareBatch()(batch)[0])
    inputs, _ = RegistrationPrepareBatch(regularisation_weight=1.0)(batch)
    inputs[:, -1] = -1.0
    with pytest.raises(ValueError, match="finite and > 0"):
        net(inputs)
    with pytest.raises(ValueError, match="weight_range"):
        ConditionedJointRegSegNet(**OPTIONS, weight_range=(10.0, 0.1))


def test_the_joint_loss_uses_each_pairs_weight():
    torch.manual_seed(0)
    batch = _pair()
    packed = torch.cat([torch.randn(2, 3, 16, 16, 16) * 0.5, torch.randn(2, 4, 16, 16, 16)], 1)
    loss = JointRegSegLoss(num_classes=2, spatial_dims=3, similarity="mse", smoothness_weight=1.0, reduction="none")
    terms = loss.sample_terms(packed, batch)
    weights = torch.tensor([0.1, 5.0])
    expected = terms["similarity"] + weights * terms["smoothness"] + loss.seg_weight * terms["segmentation"]
    torch.testing.assert_close(loss(packed, {**batch, "regularisation_weight": weights}), expected)
    plain = terms["similarity"] + terms["smoothness"] + loss.seg_weight * terms["segmentation"]
    torch.testing.assert_close(loss(packed, batch), plain)  # the config's weight
    with pytest.raises(ValueError, match="one value per pair"):
        loss(packed, {**batch, "regularisation_weight": torch.tensor([1.0, 2.0, 3.0])})


def test_the_overlay_trains_over_drawn_weights_from_plain_weights_and_infers_at_the_configured_one(tmp_path):
    """configs/joint_conditioned.json on the tumour campaign's training configs: the conditioned joint network,
    plain joint weights accepted as a start (FiLM at zero), λ drawn per pair for training and the configured λ for
    validation and inference, one training step through the parsed objects."""
    from bundle.configs import checkpoint_overlays, read_config
    from conftest import REPO_ROOT

    plain = _plain_with_a_field()
    torch.save({"network": plain.state_dict()}, tmp_path / "plain.pt")
    train = read_config(REPO_ROOT, ["train.json", "tumour_campaign.json", "joint_conditioned.json"],
                        {"init_ckpt": str(tmp_path / "plain.pt"), "regularisation_weight": 0.5})
    net = train.get_parsed_content("initial_network")
    assert isinstance(net, ConditionedJointRegSegNet) and net.weight_range == (0.1, 10.0)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], value)
    trainer_batch, validator_batch = train.get_parsed_content("train_prepare_batch"), train.get_parsed_content("prepare_batch")
    assert trainer_batch.regularisation_range == (0.1, 10.0) and validator_batch.regularisation_weight == 0.5
    assert "moving_tumour" in trainer_batch.label_keys
    inputs, targets = trainer_batch(_pair(batch=2))
    value = train.get_parsed_content("loss")(net(inputs), targets)
    value.backward()
    assert torch.isfinite(value) and targets["regularisation_weight"].shape == (2,)

    # inference: the overlay is found from the checkpoint's parameters; --regularisation_weight reaches the batch
    state = _trained_film(ConditionedJointRegSegNet(**OPTIONS)).state_dict()
    overlays = checkpoint_overlays(REPO_ROOT, ["inference.json"], state)
    assert overlays == ["joint.json", "tumour.json", "tumour_whole.json", "joint_conditioned.json"]
    infer = read_config(REPO_ROOT, ["inference.json", *overlays], {"regularisation_weight": 3.0})
    assert infer.get_parsed_content("prepare_batch").regularisation_weight == 3.0
    assert isinstance(infer.get_parsed_content("network_def"), ConditionedJointRegSegNet)
    # the plain joint model keeps no λ channel
    assert checkpoint_overlays(REPO_ROOT, ["inference.json"], plain.state_dict()) == ["joint.json", "tumour.json", "tumour_whole.json"]


def test_the_segmentation_path_loads_a_conditioned_checkpoint_and_nothing_else_extra(tmp_path):
    from bundle.configs import checkpoint_overlays, read_config
    from conftest import REPO_ROOT

    net = _trained_film(ConditionedJointRegSegNet(**OPTIONS))
    torch.save(net.state_dict(), tmp_path / "conditioned.pt")
    with pytest.raises(ValueError, match="does not fit the network"):
        load_weights(TumourSegmentationNet(**OPTIONS), tmp_path / "conditioned.pt")
    overlays = checkpoint_overlays(REPO_ROOT, ["inference.json"], net.state_dict())
    parser = read_config(REPO_ROOT, ["inference.json", *overlays, "inference_segmentation.json"],
                         {"ckpt_path": str(tmp_path / "conditioned.pt"), "device": "$torch.device('cpu')"})
    segmenter = parser.get_parsed_content("network")
    assert isinstance(segmenter, TumourSegmentationNet)
    image = _pair()["fixed"]
    with torch.no_grad():
        torch.testing.assert_close(segmenter(image), net.segment(image))
    # only the listed prefixes are dropped: any other foreign key still fails
    torch.save({**net.state_dict(), "other.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="other.weight"):
        load_weights(TumourSegmentationNet(**OPTIONS), tmp_path / "foreign.pt", unexpected_ok=("embed.", "film_"))


def test_the_finetune_overlay_trains_only_the_registration_path_and_selects_on_the_objective(tmp_path):
    """configs/joint_conditioned_finetune.json: from plain joint weights, the optimiser holds the registration decoder,
    its head and the FiLM layers only (a step leaves the encoder and the segmentation path as they were, so the
    segmentation stays the plain model's), and the validation key is the registration objective at the validation λ."""
    from bundle.configs import read_config
    from bundle.metrics import RegistrationObjective
    from conftest import REPO_ROOT

    plain = _plain_with_a_field()
    torch.save({"network": plain.state_dict()}, tmp_path / "plain.pt")
    parser = read_config(REPO_ROOT, ["train.json", "tumour_campaign.json", "joint_conditioned.json", "joint_conditioned_finetune.json"],
                         {"init_ckpt": str(tmp_path / "plain.pt")})
    net, optimiser = parser.get_parsed_content("initial_network"), parser.get_parsed_content("optimizer")
    trained = {id(p) for group in optimiser.param_groups for p in group["params"]}
    names = {name for name, p in net.named_parameters() if id(p) in trained}
    assert names and all(n.startswith(("reg_decoder.", "reg_head.", "embed.", "film_")) for n in names)
    assert {n.split(".")[0] for n in names} == {"reg_decoder", "reg_head", "embed", "film_decoder"}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inputs, targets = parser.get_parsed_content("train_prepare_batch")(_pair(batch=2))
    parser.get_parsed_content("loss")(net(inputs), targets).backward()
    optimiser.step()
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("encoder.", "seg_decoder.", "seg_head.")))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("reg_"))
    key = parser.get_parsed_content("validate#key_metric")
    assert list(key) == ["val_objective"] and isinstance(key["val_objective"], RegistrationObjective)


def test_freezing_names_only_existing_parameters():
    from bundle.engines import freeze_parameters

    net = JointRegSegNet(**OPTIONS)
    trainable = freeze_parameters(net, ["seg_head."])
    assert len(trainable) == len(list(net.parameters())) - 2 and not net.seg_head.weight.requires_grad
    with pytest.raises(ValueError, match="segmentation_head"):
        freeze_parameters(JointRegSegNet(**OPTIONS), ["segmentation_head."])
