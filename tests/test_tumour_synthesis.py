"""Synthetic tumours: RandTumourImplantd (tumour labels in a healthy label map) and RandSynthesiseTumourImaged
(T1c + FLAIR drawn from it, with the oedema / core classes)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from bundle.transforms import RandSynthesiseTumourImaged, RandTumourImplantd, tumour_classes
from bundle.transforms.tumour_synthesis import ENHANCING, NECROSIS, OEDEMA, TUMOUR_LABELS


def _brain(dtype=torch.int16) -> MetaTensor:
    """A 48^3 2 mm 'brain': white matter (2, 41) in a cortex shell (3, 42), ventricles (4), skull (0 around)."""
    label = torch.zeros(1, 48, 48, 48, dtype=dtype)
    label[:, 4:44, 4:44, 4:44] = 3
    label[:, 4:44, 24:44, 4:44] = 42
    label[:, 8:40, 8:24, 8:40] = 2
    label[:, 8:40, 24:40, 8:40] = 41
    label[:, 20:28, 20:28, 20:28] = 4
    return MetaTensor(label, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))


def test_implant_puts_a_necrotic_core_and_oedema_inside_the_brain_only():
    brain = _brain()
    implant = RandTumourImplantd("label", core_radius_mm=(8, 10), oedema_margin_mm=(6, 8), necrosis_prob=1.0,
                                 mass_effect=(0.3, 0.3)).set_random_state(1)
    out = implant({"label": brain})["label"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, brain.affine) and out.dtype == torch.int16
    values = out[0]
    for label in TUMOUR_LABELS:
        assert (values == label).sum() > 0, label
    assert not torch.isin(values[brain[0] == 0], torch.tensor(TUMOUR_LABELS, dtype=values.dtype)).any()
    # necrosis is surrounded: its centroid lies inside the enhancing rim's bounding box, oedema outside the core
    necrosis, rim = torch.nonzero(values == NECROSIS).float(), torch.nonzero(values == ENHANCING).float()
    assert ((necrosis.mean(0) > rim.min(0).values) & (necrosis.mean(0) < rim.max(0).values)).all()
    core = (values == NECROSIS) | (values == ENHANCING)
    assert not (core & (values == OEDEMA)).any()
    # the rest of the map keeps its labels (pushed by the mass effect, nothing new)
    healthy = set(torch.unique(values[~torch.isin(values, torch.tensor(TUMOUR_LABELS, dtype=values.dtype))]).tolist())
    assert healthy <= {0, 2, 3, 4, 41, 42}


def test_implant_without_necrosis_oedema_or_firing():
    brain = _brain()
    solid = RandTumourImplantd("label", core_radius_mm=(8, 10), oedema_margin_mm=(0, 0), necrosis_prob=0.0,
                               mass_effect=(0, 0)).set_random_state(0)({"label": brain})["label"]
    assert set(torch.unique(solid).tolist()) - {0, 2, 3, 4, 41, 42} == {ENHANCING}
    unchanged = RandTumourImplantd("label", prob=0.0).set_random_state(0)({"label": brain})["label"]
    assert torch.equal(unchanged, brain)


def test_implant_promotes_small_integer_maps_and_rejects_bad_ones():
    out = RandTumourImplantd("label").set_random_state(0)({"label": _brain(torch.uint8)})["label"]
    assert out.dtype == torch.int16 and int(out.max()) in TUMOUR_LABELS
    with pytest.raises(ValueError, match="no brain voxel"):
        RandTumourImplantd("label").set_random_state(0)({"label": torch.zeros(1, 8, 8, 8, dtype=torch.int16)})
    with pytest.raises(ValueError, match="integer labels"):
        RandTumourImplantd("label").set_random_state(0)({"label": torch.full((1, 8, 8, 8), 0.5)})
    with pytest.raises(ValueError, match="mass_effect"):
        RandTumourImplantd("label", mass_effect=(0.5, 1.2))


def test_tumour_classes_regions_and_whole():
    label = torch.tensor([[0, 2, NECROSIS, ENHANCING, OEDEMA]])
    assert tumour_classes(label).tolist() == [[0, 0, 2, 2, 1]]
    assert tumour_classes(label, regions=False).tolist() == [[0, 0, 1, 1, 1]]


def test_synthesised_t1c_and_flair_show_the_tumour_as_these_sequences_do():
    brain = _brain()
    item = RandTumourImplantd("label", core_radius_mm=(12, 14), oedema_margin_mm=(6, 8), necrosis_prob=1.0,
                              mass_effect=(0, 0)).set_random_state(3)({"label": brain})
    label = item["label"][0].clone()
    out = RandSynthesiseTumourImaged("label", "image", "tumour", nonenhancing_prob=0.0).set_random_state(3)(item)
    image, classes = out["image"], out["tumour"]
    assert image.shape == (2, 48, 48, 48) and isinstance(image, MetaTensor) and torch.equal(image.affine, brain.affine)
    assert float(image.min()) >= 0 and float(image.max()) <= 1 and float(image[:, label == 0].abs().max()) == 0
    assert torch.equal(classes[0], tumour_classes(label[None])[0]) and classes.dtype == torch.int16
    t1c, flair = image[0], image[1]
    mean = lambda channel, value: float(channel[label == value].mean())  # noqa: E731
    assert mean(t1c, ENHANCING) > mean(t1c, 2) > mean(t1c, OEDEMA) > mean(t1c, 4)  # enhancing rim, oedema dark
    assert mean(t1c, NECROSIS) < mean(t1c, ENHANCING)
    assert mean(flair, OEDEMA) > mean(flair, 3) > mean(flair, 2) > mean(flair, 4)  # oedema bright, CSF suppressed
    whole = RandSynthesiseTumourImaged("label", "image", "tumour", regions=False).set_random_state(3)(
        {"label": item["label"]})
    assert set(torch.unique(whole["tumour"]).tolist()) == {0, 1}


def test_nonenhancing_cores_are_not_brighter_than_white_matter_in_t1c():
    item = RandTumourImplantd("label", core_radius_mm=(8, 10), necrosis_prob=0.0, mass_effect=(0, 0)).set_random_state(
        5)({"label": _brain()})
    label = item["label"][0].clone()
    out = RandSynthesiseTumourImaged("label", "image", "tumour", nonenhancing_prob=1.0).set_random_state(5)(item)
    t1c = out["image"][0]
    assert float(t1c[label == ENHANCING].mean()) < float(t1c[label == 2].mean())


def test_synthesis_checks_its_keys():
    with pytest.raises(ValueError, match="one output per key"):
        RandSynthesiseTumourImaged(["a", "b"], ["i"], ["t", "u"])


def test_tumour_class_names_follow_the_training_classes():
    from bundle.transforms import tumour_class_names

    assert tumour_class_names(2) == ("background", "tumour")
    assert tumour_class_names(3) == ("background", "oedema", "tumour core")  # tumour_classes(..., regions=True)
    with pytest.raises(ValueError, match="not 4"):
        tumour_class_names(4)
