"""Probabilistic encoder features with a Gaussian prior and the KL term (the bilevel feature-learning seed)."""

from __future__ import annotations

import pytest
import torch

from bundle.losses import FeatureKLLoss, RegistrationLoss
from bundle.networks import ProbabilisticRegistrationUNet, RegistrationUNet, gaussian_kl


def test_kl_matches_the_closed_form_and_vanishes_at_the_prior():
    mu, log_var = torch.zeros(2, 4, 3, 3, 3), torch.zeros(2, 4, 3, 3, 3)
    torch.testing.assert_close(gaussian_kl(mu, log_var), torch.zeros(2))
    torch.manual_seed(0)
    mu, log_var = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 2, 2, 2)
    # 1/2 (tr Sigma + ||mu||^2 - log det Sigma - m) per voxel, averaged over the 8 voxels
    expected = 0.5 * (log_var.exp().sum(1) + (mu ** 2).sum(1) - log_var.sum(1) - 4).mean()
    torch.testing.assert_close(gaussian_kl(mu, log_var), expected.view(1))
    # and against torch.distributions
    p = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    q = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, log_var), torch.distributions.kl_divergence(p, q).sum(1).flatten(1).mean(1))


def test_the_probabilistic_network_starts_as_the_plain_one_in_evaluation_and_samples_in_training():
    torch.manual_seed(0)
    plain = RegistrationUNet(3, 2)
    torch.nn.init.normal_(plain.head.conv.weight, std=0.1)
    net = ProbabilisticRegistrationUNet(3, 2)
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("gaussians.") for k in missing)
    x = torch.rand(2, 2, 16, 16, 16)
    net.eval()
    torch.testing.assert_close(net(x), plain.eval()(x))  # mu = h at start
    assert net.kl.shape == (2,) and bool((net.kl > 0).all())
    net.train()
    assert not torch.equal(net(x), net(x))  # reparameterised samples


def test_the_kl_term_is_added_with_its_weight_and_reaches_the_gaussian_heads():
    torch.manual_seed(0)
    net = ProbabilisticRegistrationUNet(3, 2)
    torch.nn.init.normal_(net.head.conv.weight, std=0.1)
    base = RegistrationLoss(similarity="mse")
    loss = FeatureKLLoss(base, net, kl_weight=0.5)
    assert not any(True for _ in loss.parameters()), "the network's weights must not become the loss's"
    batch = {"moving": torch.rand(2, 1, 16, 16, 16), "fixed": torch.rand(2, 1, 16, 16, 16)}
    pred = net(torch.cat([batch["moving"], batch["fixed"]], 1))
    value = loss(pred, batch)
    torch.testing.assert_close(value, base(pred, batch) + 0.5 * net.kl.mean())
    value.backward()
    assert net.gaussians[0].log_var.weight.grad.abs().sum() > 0
    per_pair = FeatureKLLoss(RegistrationLoss(similarity="mse", reduction="none"), net, 0.5)(pred.detach(), batch)
    assert per_pair.shape == (2,)
    with pytest.raises(ValueError, match="no 'kl' term"):
        FeatureKLLoss(base, RegistrationUNet(3, 2))
    with pytest.raises(ValueError, match="kl_weight"):
        FeatureKLLoss(base, net, -1.0)
    with pytest.raises(RuntimeError, match="forward pass"):
        FeatureKLLoss(base, ProbabilisticRegistrationUNet(3, 2))(pred, batch)


def test_the_overlays_train_with_the_kl_term_and_infer_with_the_probabilistic_network():
    from bundle.configs import is_probabilistic, read_config
    from conftest import REPO_ROOT

    train = read_config(REPO_ROOT, ["train.json", "registration_only.json", "probabilistic_features.json",
                                    "probabilistic_features_train.json"], {"feature_kl_weight": 0.2})
    net = train.get_parsed_content("network_def")
    assert isinstance(net, ProbabilisticRegistrationUNet) and is_probabilistic(net.state_dict())
    assert train["train#trainer#loss_function"] == "@feature_loss"
    loss = train.get_parsed_content("feature_loss")
    assert isinstance(loss, FeatureKLLoss) and loss.kl_weight == 0.2 and loss._network[0] is net
    batch = {"moving": torch.rand(1, 1, 16, 16, 16), "fixed": torch.rand(1, 1, 16, 16, 16)}
    value = loss(net(torch.cat([batch["moving"], batch["fixed"]], 1)), batch)
    assert torch.isfinite(value)
    infer = read_config(REPO_ROOT, ["inference.json", "registration_only.json", "probabilistic_features.json"])
    assert isinstance(infer.get_parsed_content("network_def"), ProbabilisticRegistrationUNet)
    assert not is_probabilistic(RegistrationUNet().state_dict())
