"""The searched registration U-Net (AutoReg): the operation set, the mixture network of the search and the network
built from a genotype."""

from __future__ import annotations

import json

import pytest
import torch

from bundle.networks import (
    OPERATIONS,
    VM1_CHANNELS,
    MixedOperation,
    RegistrationUNet,
    SearchableRegistrationUNet,
    SearchedRegistrationUNet,
    block_count,
    make_operation,
)


@pytest.mark.parametrize("name", list(OPERATIONS))
@pytest.mark.parametrize("stride", [1, 2])
def test_every_operation_keeps_or_halves_the_size(name, stride):
    op = make_operation(name, 3, 4, 6, stride)
    out = op(torch.rand(1, 4, 16, 12, 8))
    assert out.shape == (1, 6, 16 // stride, 12 // stride, 8 // stride)
    assert make_operation(name, 2, 4, 6, stride)(torch.rand(1, 4, 16, 12)).shape == (1, 6, 16 // stride, 12 // stride)


def test_unknown_operations_and_genotypes_are_refused():
    with pytest.raises(ValueError, match="unknown operation 'conv_9'"):
        make_operation("conv_9", 3, 2, 2)
    with pytest.raises(ValueError, match="operations must be names"):
        SearchableRegistrationUNet(3, 2, operations=["conv_3", "pool"])
    with pytest.raises(ValueError, match="genotype must name 11 operations"):
        SearchedRegistrationUNet(3, 2, genotype=["conv_3"] * 10)


@pytest.mark.parametrize("channels", [None, VM1_CHANNELS])
def test_block_count_is_the_genotype_length_of_every_network(channels):
    kw = {} if channels is None else {"channels": channels}
    n = block_count(RegistrationUNet(3, 2, **kw))
    assert n == (11 if channels is None else 10)
    assert SearchableRegistrationUNet(3, 2, operations=["conv_1"], **kw).num_blocks == n
    assert block_count(SearchedRegistrationUNet(3, 2, genotype=["conv_1"] * n, **kw)) == n
    with pytest.raises(ValueError, match=f"genotype must name {n} operations"):
        SearchedRegistrationUNet(3, 2, genotype=["conv_1"] * (n + 1), **kw)


@pytest.mark.parametrize("half_res", [False, True])
def test_the_mixture_network_registers_like_the_unet_and_splits_its_parameters(half_res):
    torch.manual_seed(0)
    net = SearchableRegistrationUNet(3, 2, half_res=half_res, integration_steps=2, operations=["conv_1", "conv_3", "dil_conv_3"])
    x = torch.rand(1, 2, 32, 32, 32)
    assert net(x).shape == (1, 3, 32, 32, 32)
    arch, weights = net.arch_parameters(), net.weight_parameters()
    assert len(arch) == net.num_blocks == 11 and all(a.shape == (3,) for a in arch)
    assert len(arch) + len(weights) == len(list(net.parameters()))
    assert net.genotype() == ["conv_1"] * 11  # uniform α: the first operation wins the tie
    net.mixed_operations()[0].alpha.data = torch.tensor([0.0, 0.0, 1.0])
    assert net.genotype()[0] == "dil_conv_3" and net.operation_weights()[0]["dil_conv_3"] > 0.5


def test_weights_load_only_into_the_genotype_they_were_trained_with(tmp_path):
    """conv_3 and dil_conv_3 have the same weight shapes: the genotype in the state dict tells them apart."""
    from bundle.engines.checkpoints import load_weights

    trained = SearchedRegistrationUNet(3, 2, genotype=["conv_3"] * 11)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    same = load_weights(SearchedRegistrationUNet(3, 2, genotype=["conv_3"] * 11), path)
    for a, b in zip(same.parameters(), trained.parameters()):
        assert torch.equal(a, b)
    other = SearchedRegistrationUNet(3, 2, genotype=["dil_conv_3"] + ["conv_3"] * 10)
    with pytest.raises(ValueError, match=f"checkpoint {path} does not fit.*trained with genotype.*'conv_3'.*built with.*'dil_conv_3'"):
        load_weights(other, path)


def test_all_3_conv_is_the_hand_designed_network():
    """The genotype of 3x3x3 convolutions everywhere, given the plain network's weights, computes the same field."""
    torch.manual_seed(0)
    plain = RegistrationUNet(3, 2, integration_steps=3)
    torch.nn.init.normal_(plain.head.conv.weight, std=0.1)
    searched = SearchedRegistrationUNet(3, 2, integration_steps=3, genotype=["conv_3"] * 11)
    assert sum(p.numel() for p in searched.parameters()) == sum(p.numel() for p in plain.parameters())
    source = [b.conv for b in (*plain.encoder.blocks, *plain.decoder.up_blocks, *plain.decoder.extra)]
    target = [b[0] for b in (*searched.encoder.blocks, *searched.decoder.up_blocks, *searched.decoder.extra)]
    for s, t in zip(source, target):
        t.load_state_dict(s.state_dict())
    searched.head.load_state_dict(plain.head.state_dict())
    x = torch.rand(1, 2, 32, 32, 32)
    torch.testing.assert_close(searched(x), plain(x))


def test_a_first_order_search_step_moves_alpha_on_validation_and_weights_on_training():
    torch.manual_seed(0)
    net = SearchableRegistrationUNet(2, 2, operations=["conv_1", "conv_3", "conv_5"])
    torch.nn.init.normal_(net.head.conv.weight, std=0.1)
    weights_opt = torch.optim.Adam(net.weight_parameters(), lr=1e-3)
    arch_opt = torch.optim.Adam(net.arch_parameters(), lr=3e-2)
    before_alpha = [a.detach().clone() for a in net.arch_parameters()]
    before_w = [w.detach().clone() for w in net.weight_parameters()]
    x = torch.rand(2, 2, 32, 32)
    arch_opt.zero_grad()
    net(x).pow(2).mean().backward()
    arch_opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(net.arch_parameters(), before_alpha))
    assert all(torch.equal(w, b) for w, b in zip(net.weight_parameters(), before_w))
    weights_opt.zero_grad()
    net(x).pow(2).mean().backward()
    weights_opt.step()
    assert any(not torch.equal(w, b) for w, b in zip(net.weight_parameters(), before_w))
    assert isinstance(net.mixed_operations()[0], MixedOperation)


def test_the_search_step_leaves_the_training_steps_loss_terms_for_the_log():
    """The training log reads the loss's ``last_terms`` after the iteration; the α step (on a validation pair) runs
    the same loss and must not replace the training pair's terms with its own."""
    from types import SimpleNamespace

    from bundle.engines import ArchitectureSearchStep
    from bundle.losses import RegistrationLoss

    torch.manual_seed(0)
    net = SearchableRegistrationUNet(2, 2, operations=["conv_1", "conv_3"])
    loss = RegistrationLoss(spatial_dims=2)
    x_train, x_val = torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16) * 5
    target = lambda x: {"moving": x[:, :1], "fixed": x[:, 1:]}  # noqa: E731
    loss(net(x_train), target(x_train))
    training_terms = dict(loss.last_terms)
    search = ArchitectureSearchStep(net, [{"x": x_val}], learning_rate=0.05)
    engine = SimpleNamespace(prepare_batch=lambda b, device, non_blocking: (b["x"], target(b["x"])),
                             state=SimpleNamespace(device="cpu", iteration=1), non_blocking=False,
                             loss_function=loss, inferer=lambda x, n: n(x), network=net)
    search.step(engine)
    assert loss.last_terms == training_terms and search.last_loss != pytest.approx(float(sum(training_terms.values())))


def test_the_search_step_needs_a_searchable_network_and_carries_its_optimizer_state(tmp_path):
    from types import SimpleNamespace

    from bundle.engines import ArchitectureSearchStep

    with pytest.raises(ValueError, match="no architecture parameters"):
        ArchitectureSearchStep(RegistrationUNet(2, 2), [])
    torch.manual_seed(0)
    net = SearchableRegistrationUNet(2, 2, operations=["conv_1", "conv_3"])
    torch.nn.init.normal_(net.head.conv.weight, std=0.1)
    pairs = [{"x": torch.rand(1, 2, 16, 16)} for _ in range(3)]
    search = ArchitectureSearchStep(net, pairs, learning_rate=0.05, genotype_file=tmp_path / "genotype.json")
    engine = SimpleNamespace(prepare_batch=lambda b, device, non_blocking: (b["x"], None),
                             state=SimpleNamespace(device="cpu", iteration=5), non_blocking=False,
                             loss_function=lambda pred, target: pred.pow(2).mean(), inferer=lambda x, n: n(x), network=net)
    before = [a.detach().clone() for a in net.arch_parameters()]
    for _ in range(4):  # more steps than pairs: the loader is cycled
        search.step(engine)
    assert all(not torch.equal(a, b) for a, b in zip(net.arch_parameters(), before)) and search.last_loss > 0
    search.write_genotype(engine)
    import json

    record = json.loads((tmp_path / "genotype.json").read_text())
    assert record["iteration"] == 5 and record["genotype"] == net.genotype()
    again = ArchitectureSearchStep(net, pairs)
    again.load_state_dict(search.state_dict())
    assert again.optimizer.state_dict()["state"][0]["step"] == 4


def test_read_genotype_reads_a_search_record_or_a_list_and_names_a_bad_file(tmp_path):
    from bundle.networks import read_genotype

    record = tmp_path / "genotype.json"
    record.write_text(json.dumps({"iteration": 50, "genotype": ["conv_3", "sep_conv_5"], "operation_weights": []}))
    assert read_genotype(record) == ["conv_3", "sep_conv_5"]
    plain = tmp_path / "plain.json"
    plain.write_text('["dil_conv_7"]')
    assert read_genotype(plain) == ["dil_conv_7"]
    with pytest.raises(FileNotFoundError, match="missing.json: no genotype file"):
        read_genotype(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a JSON genotype file"):
        read_genotype(bad)
    bad.write_text(json.dumps({"genotype": ["conv_3", "pool_2"]}))
    with pytest.raises(ValueError, match="bad.json: expected a non-empty list of operation names"):
        read_genotype(bad)


def test_read_genotype_reads_it_from_trained_weights(tmp_path):
    """The shipped weights of a searched network are enough to rebuild it (no separate genotype.json)."""
    from bundle.engines.checkpoints import load_weights
    from bundle.networks import read_genotype

    genotype = ["sep_conv_3", "dil_conv_5"] + ["conv_3"] * 9
    trained = SearchedRegistrationUNet(3, 2, genotype=genotype)
    plain_state, resume_state = tmp_path / "model.pt", tmp_path / "checkpoint.pt"
    torch.save(trained.state_dict(), plain_state)
    torch.save({"network": trained.state_dict(), "optimizer": {}}, resume_state)
    for path in (plain_state, resume_state):
        assert read_genotype(path) == genotype
        load_weights(SearchedRegistrationUNet(3, 2, genotype=read_genotype(path)), path)
    other = tmp_path / "plain_unet.pt"
    torch.save(RegistrationUNet(3, 2).state_dict(), other)
    with pytest.raises(ValueError, match="plain_unet.pt: this checkpoint holds no genotype"):
        read_genotype(other)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        read_genotype(broken)
