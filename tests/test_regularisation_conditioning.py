"""The network conditioned on the regularisation weight (FiLM), the λ channel of the prepare_batch and the
loss's per-pair smoothness weight (issue: regularisation chosen by learning)."""

from __future__ import annotations

import pytest
import torch

from bundle.engines import RegistrationPrepareBatch
from bundle.losses import RegistrationLoss
from bundle.networks import ConditionedRegistrationUNet, RegistrationUNet, regularisation_code


def _pair(shape=(16, 16, 16), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"moving": torch.rand(batch, 1, *shape, generator=g), "fixed": torch.rand(batch, 1, *shape, generator=g)}


def test_zero_initialised_film_makes_the_conditioned_network_the_plain_one_for_every_weight():
    torch.manual_seed(0)
    plain = RegistrationUNet(3, 2, half_res=True, integration_steps=3)
    torch.nn.init.normal_(plain.head.conv.weight, std=0.1)  # a non-zero field
    conditioned = ConditionedRegistrationUNet(3, 2, half_res=True, integration_steps=3)
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("embed.", "film_")) for k in missing)
    batch = _pair()
    expected = plain(torch.cat([batch["moving"], batch["fixed"]], 1))
    assert expected.abs().max() > 1e-3
    for weight in (0.01, 1.0, 10.0):
        inputs, targets = RegistrationPrepareBatch(regularisation_weight=weight)(batch)
        assert inputs.shape[1] == 3 and torch.all(inputs[:, 2] == weight)
        torch.testing.assert_close(conditioned(inputs), expected)


def test_a_conditioned_training_starts_from_plain_weights_only_when_the_film_keys_are_allowed_missing(tmp_path):
    from bundle.engines import load_weights

    torch.manual_seed(0)
    plain = RegistrationUNet(3, 2, half_res=True, integration_steps=3)
    torch.nn.init.normal_(plain.head.conv.weight, std=0.1)
    torch.save({"network": plain.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not fit the network"):
        load_weights(ConditionedRegistrationUNet(3, 2, half_res=True, integration_steps=3), tmp_path / "plain.pt")
    conditioned = load_weights(ConditionedRegistrationUNet(3, 2, half_res=True, integration_steps=3),
                               tmp_path / "plain.pt", missing_ok=("embed.", "film_"))
    batch = _pair()
    inputs, _ = RegistrationPrepareBatch(regularisation_weight=0.3)(batch)
    torch.testing.assert_close(conditioned(inputs), plain(torch.cat([batch["moving"], batch["fixed"]], 1)))
    # only the listed prefixes may be missing: a plain network's own key cannot be
    state = {k: v for k, v in plain.state_dict().items() if k != "head.conv.bias"}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="head.conv.bias"):
        load_weights(ConditionedRegistrationUNet(3, 2, half_res=True, integration_steps=3), tmp_path / "partial.pt",
                     missing_ok=("embed.", "film_"))


def test_the_weight_changes_the_field_once_film_is_trained():
    torch.manual_seed(0)
    net = ConditionedRegistrationUNet(3, 2)
    torch.nn.init.normal_(net.head.conv.weight, std=0.1)
    for film in (*net.film_encoder, *net.film_decoder):
        torch.nn.init.normal_(film.linear.weight, std=0.5)
    batch = _pair()
    low = net(RegistrationPrepareBatch(regularisation_weight=0.01)(batch)[0])
    high = net(RegistrationPrepareBatch(regularisation_weight=10.0)(batch)[0])
    assert low.shape == high.shape == (2, 3, 16, 16, 16)
    assert (low - high).abs().max() > 1e-4


def test_a_plain_batch_given_to_the_conditioned_network_is_explained():
    net = ConditionedRegistrationUNet(3, 2)
    inputs, _ = RegistrationPrepareBatch()(_pair())
    with pytest.raises(ValueError, match="regularisation weight as an extra input channel"):
        net(inputs)
    with pytest.raises(ValueError, match="finite and > 0"):
        regularisation_code(torch.tensor([1.0, 0.0]), (0.01, 10.0))
    with pytest.raises(ValueError, match="weight_range"):
        ConditionedRegistrationUNet(3, 2, weight_range=(1.0, 0.1))
    assert regularisation_code(torch.tensor([0.01, 10.0]), (0.01, 10.0)).flatten().tolist() == pytest.approx([-1, 1])


def test_training_weights_are_drawn_log_uniformly_in_the_range_and_follow_the_seed():
    prepare = RegistrationPrepareBatch(regularisation_range=(0.01, 10.0))
    torch.manual_seed(3)
    weights = torch.cat([prepare(_pair(batch=4))[1]["regularisation_weight"] for _ in range(250)])
    assert weights.min() >= 0.01 and weights.max() <= 10.0
    logs = torch.log10(weights)
    # log-uniform over 3 decades: each decade gets about a third
    for low in (-2, -1, 0):
        share = float(((logs >= low) & (logs < low + 1)).float().mean())
        assert abs(share - 1 / 3) < 0.06, (low, share)
    torch.manual_seed(3)
    again = prepare(_pair(batch=4))[1]["regularisation_weight"]
    torch.testing.assert_close(again, weights[:4])
    for bad in ({"regularisation_weight": 0.0}, {"regularisation_range": (1.0, 0.1)}, {"regularisation_range": (0.0, 1.0)}):
        with pytest.raises(ValueError, match="regularisation_"):
            RegistrationPrepareBatch(**bad)


def test_the_loss_uses_each_pairs_weight():
    torch.manual_seed(0)
    batch = _pair()
    ddf = torch.randn(2, 3, 16, 16, 16) * 0.5
    loss = RegistrationLoss(smoothness_weight=1.0, reduction="none", similarity="mse")
    terms = loss.sample_terms(ddf, batch)
    weights = torch.tensor([0.1, 5.0])
    per_pair = loss(ddf, {**batch, "regularisation_weight": weights})
    torch.testing.assert_close(per_pair, terms["similarity"] + weights * terms["smoothness"])
    torch.testing.assert_close(loss(ddf, batch), terms["similarity"] + terms["smoothness"])  # the config's weight
    with pytest.raises(ValueError, match="one value per pair"):
        loss(ddf, {**batch, "regularisation_weight": torch.tensor([1.0, 2.0, 3.0])})


def test_one_network_trained_over_weights_gives_smoother_fields_for_larger_weights():
    """A few hundred steps on one synthetic 2D pair (a shifted blob) with λ drawn per step: the trained network's
    field is smoother at λ = 10 than at λ = 0.01 and fits the pair better at λ = 0.01 — the trade-off is an input."""
    torch.manual_seed(0)
    i = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    blob = lambda cx, cy: torch.exp(-(((i[0] - cx) / 5) ** 2 + ((i[1] - cy) / 4) ** 2) / 2)[None, None]  # noqa: E731
    batch = {"moving": blob(14.0, 17.0), "fixed": blob(17.0, 15.0)}
    net = ConditionedRegistrationUNet(2, 2, channels=((8, 16, 16, 16), (16, 16, 16, 16, 8, 8)))
    loss = RegistrationLoss(similarity="mse", smoothness_weight=1.0, spatial_dims=2)
    prepare = RegistrationPrepareBatch(regularisation_range=(0.01, 10.0))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        inputs, targets = prepare(batch)
        optimiser.zero_grad()
        loss(net(inputs), targets).backward()
        optimiser.step()
    with torch.no_grad():
        out = {}
        for weight in (0.01, 10.0):
            inputs, targets = RegistrationPrepareBatch(regularisation_weight=weight)(batch)
            out[weight] = loss.sample_terms(net(inputs), targets)
    print({w: {k: float(v) for k, v in t.items()} for w, t in out.items()})
    assert out[10.0]["smoothness"] < 0.5 * out[0.01]["smoothness"]
    assert out[0.01]["similarity"] < out[10.0]["similarity"]


def test_the_overlay_wires_a_drawn_weight_into_training_and_the_configured_one_into_validation_and_inference(tmp_path):
    """configs/regularisation_conditioned.json on the registration-only configs: the conditioned network, λ drawn
    per pair by the trainer's prepare_batch, the fixed ``regularisation_weight`` for validation and inference,
    and a training step through the parsed objects."""
    from bundle.configs import is_regularisation_conditioned, read_config
    from conftest import REPO_ROOT

    train = read_config(REPO_ROOT, ["train.json", "registration_only.json", "regularisation_conditioned.json"],
                        {"regularisation_weight": 0.5, "spatial_dims": 3})
    net = train.get_parsed_content("network_def")
    assert isinstance(net, ConditionedRegistrationUNet) and net.weight_range == (0.01, 10.0)
    trainer_batch = train.get_parsed_content("train_prepare_batch")
    validator_batch = train.get_parsed_content("prepare_batch")
    assert trainer_batch.regularisation_range == (0.01, 10.0) and validator_batch.regularisation_weight == 0.5
    assert train["train#trainer"]["prepare_batch"] == "@train_prepare_batch"
    loss = train.get_parsed_content("loss")
    inputs, targets = trainer_batch(_pair(shape=(16, 16, 16), batch=2))
    value = loss(net(inputs), targets)
    value.backward()
    assert torch.isfinite(value) and targets["regularisation_weight"].shape == (2,)
    assert is_regularisation_conditioned(net.state_dict()) and not is_regularisation_conditioned(RegistrationUNet().state_dict())

    infer = read_config(REPO_ROOT, ["inference.json", "registration_only.json", "regularisation_conditioned.json"],
                        {"regularisation_weight": 2.0})
    assert infer.get_parsed_content("prepare_batch").regularisation_weight == 2.0
    assert isinstance(infer.get_parsed_content("network_def"), ConditionedRegistrationUNet)
    # a plain training config keeps one prepare_batch for both
    plain = read_config(REPO_ROOT, ["train.json", "registration_only.json"])
    assert plain["train_prepare_batch"] == "@prepare_batch"


def test_refinement_runs_on_a_conditioned_network():
    """Instance optimisation refines the conditioned network's field on the images (the λ map is input only)."""
    from bundle.engines import InstanceOptimisationInferer

    torch.manual_seed(0)
    net = ConditionedRegistrationUNet(3, 2)
    torch.nn.init.normal_(net.head.conv.weight, std=0.1)
    inputs, _ = RegistrationPrepareBatch(regularisation_weight=1.0)(_pair(batch=1))
    inferer = InstanceOptimisationInferer(RegistrationLoss(similarity="mse"), steps=3, learning_rate=0.05,
                                          progress_every=0, spatial_dims=3)
    with torch.no_grad():
        start, refined = net(inputs), inferer(inputs, net)
    assert refined.shape == start.shape and (refined - start).abs().max() > 0
