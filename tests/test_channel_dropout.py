"""Random channel (sequence) dropout for multi-sequence training."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.transforms import RandDropChanneld
from conftest import CONFIGS


def _pair():
    return {"moving": torch.rand(2, 4, 4, 4) + 0.1, "fixed": torch.rand(2, 4, 4, 4) + 0.1}


def test_drops_all_but_the_first_channel_at_the_given_rate():
    drop = RandDropChanneld(["moving", "fixed"], prob=0.25)
    drop.set_random_state(0)
    dropped, n = {"moving": 0, "fixed": 0}, 400
    for _ in range(n):
        item = _pair()
        out = drop(item)
        for key in dropped:
            assert torch.equal(out[key][0], item[key][0])  # T1c (the first channel) is never dropped
            if not torch.equal(out[key][1], item[key][1]):
                assert out[key][1].abs().max() == 0  # dropped: all zeros
                dropped[key] += 1
    for key, count in dropped.items():
        assert abs(count / n - 0.25) < 0.06, (key, count)


def test_keys_are_drawn_independently_and_input_is_not_modified():
    drop = RandDropChanneld(["moving", "fixed"], prob=0.5)
    drop.set_random_state(1)
    both, one = 0, 0
    for _ in range(400):
        item = _pair()
        before = {k: v.clone() for k, v in item.items()}
        out = drop(item)
        assert all(torch.equal(item[k], before[k]) for k in item)  # the input item is left as it was
        hits = [out[k][1].abs().max() == 0 for k in ("moving", "fixed")]
        both += all(hits)
        one += sum(hits) == 1
    assert 0.15 < both / 400 < 0.35 and 0.4 < one / 400 < 0.6  # 1/4 and 1/2 for independent draws


def test_explicit_channels_and_bad_values():
    out = RandDropChanneld("moving", channels=[0], prob=1.0)({"moving": torch.ones(2, 2, 2, 2)})
    assert out["moving"][0].max() == 0 and out["moving"][1].min() == 1
    single = {"moving": torch.ones(1, 2, 2, 2)}
    assert torch.equal(RandDropChanneld("moving", prob=1.0)(single)["moving"], single["moving"])  # nothing to drop
    with pytest.raises(ValueError, match="out of range"):
        RandDropChanneld("moving", channels=[3], prob=1.0)({"moving": torch.ones(2, 2, 2, 2)})
    with pytest.raises(ValueError, match="prob"):
        RandDropChanneld("moving", prob=1.5)


def test_on_in_the_tumour_campaign_off_by_default():
    def augmentation(*files):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        return [type(t).__name__ for t in parser.get_parsed_content("train#augmentation")]

    assert "RandDropChanneld" not in augmentation("train.json")
    assert augmentation("train.json", "tumour_campaign.json")[-1] == "RandDropChanneld"  # after the noise
