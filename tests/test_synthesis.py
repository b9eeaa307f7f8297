"""RandSynthesiseImaged (images from label maps) and the evaluation datasets built on it."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.transforms import FREESURFER_30, RandSynthesiseImaged, RandSynthesisePaird
from conftest import SHARED_DATA


def _label_map() -> torch.Tensor:
    """Nested boxes: white matter (2) inside cortex (3), a ventricle (4), right WM (41), skull (515)."""
    label = torch.zeros(1, 32, 32, 32, dtype=torch.int16)
    label[:, 2:30, 2:30, 2:30] = 515
    label[:, 4:28, 4:28, 4:28] = 3
    label[:, 8:24, 8:16, 8:24] = 2
    label[:, 8:24, 16:24, 8:24] = 41
    label[:, 14:18, 14:18, 14:18] = 4
    return label


def test_t1_contrast_orders_tissues_and_strips_skull():
    out = RandSynthesiseImaged("label", "image").set_random_state(3)({"label": _label_map()})
    image, label = out["image"], out["label"]
    assert image.shape == (1, 32, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert not (label == 515).any() and (label == 0).sum() == (_label_map() == 0).sum() + (_label_map() == 515).sum()
    assert float(image[label == 0].abs().max()) == 0.0  # background (and the stripped skull) black
    core = lambda v: float(image[0, 10:22, 10:14, 10:22][label[0, 10:22, 10:14, 10:22] == v].mean())  # noqa: E731
    wm, gm, csf = core(2), float(image[0, 5, 5:27, 5:27].mean()), float(image[label == 4].mean())
    assert wm > gm > csf, (wm, gm, csf)


def test_synthetic_pairs_get_new_images_and_training_classes_real_pairs_pass():
    """``RandSynthesisePaird``: a flagged pair's images are drawn from its label maps (independently), its
    labels become classes 1..30 in ``FREESURFER_30`` order (others 0), the flag is dropped; real pairs pass."""
    label = MetaTensor(_label_map(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    item = {"moving": label.float(), "fixed": label.float(), "moving_label": label.clone(), "fixed_label": label.clone(),
            "synthesise": True}
    pair = RandSynthesisePaird(["moving_label", "fixed_label"], ["moving", "fixed"]).set_random_state(0)
    out = pair(item)
    assert "synthesise" not in out
    classes = list(FREESURFER_30)
    for key in ("moving_label", "fixed_label"):
        assert isinstance(out[key], MetaTensor) and torch.equal(out[key].affine, label.affine)
        assert set(torch.unique(out[key]).tolist()) == {0, 1 + classes.index(2), 1 + classes.index(3),
                                                         1 + classes.index(4), 1 + classes.index(41)}
        assert int(out[key].max()) <= len(classes)
    for key in ("moving", "fixed"):
        assert out[key].shape == label.shape and 0.0 <= float(out[key].min()) and float(out[key].max()) <= 1.0
        assert float(out[key][label == 515].abs().max()) == 0.0  # skull stripped, not the label map's values
    assert not torch.equal(out["moving"], out["fixed"])  # independent draws
    real = {"moving": torch.rand(1, 8, 8, 8), "fixed": torch.rand(1, 8, 8, 8), "moving_label": torch.ones(1, 8, 8, 8)}
    passed = pair(dict(real))
    assert passed.keys() == real.keys() and all(passed[k] is real[k] for k in real)
    kept = RandSynthesisePaird(["moving_label"], ["moving"], label_values=None).set_random_state(0)(
        {"moving": label.float(), "moving_label": label.clone(), "synthesise": 1})
    assert set(torch.unique(kept["moving_label"]).tolist()) == {0, 2, 3, 4, 41}  # values kept, skull stripped


def test_seeded_draws_repeat_and_differ_between_seeds():
    draw = lambda seed, contrast="t1": RandSynthesiseImaged("label", "image", contrast=contrast).set_random_state(seed)(  # noqa: E731
        {"label": _label_map()})["image"]
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert not torch.allclose(draw(1, "random"), draw(1, "t1"))


def test_whole_head_kept_and_meta_preserved():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    out = RandSynthesiseImaged("label", "image", brain_labels=None).set_random_state(0)(
        {"label": MetaTensor(_label_map(), affine=affine)})
    assert (out["label"] == 515).any() and float(out["image"][out["label"] == 515].mean()) > 0
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, affine)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="contrast"):
        RandSynthesiseImaged("label", "image", contrast="t2")
    with pytest.raises(ValueError, match="image_keys"):
        RandSynthesiseImaged(["a", "b"], "image")
    with pytest.raises(ValueError, match="integer labels"):
        RandSynthesiseImaged("label", "image")({"label": _label_map().float() + 0.5})
    nan = _label_map().float()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="integer labels"):
        RandSynthesiseImaged("label", "image")({"label": nan})


@pytest.mark.skipif(not (SHARED_DATA / "synthseg_label_maps").is_dir(), reason="../shared/data/synthseg_label_maps absent")
def test_synthseg_test_subject_cropped_in_world_space(tmp_path):
    """The evaluation's synthesised subject keeps each label at its world position after the brain crop."""
    import nibabel as nib

    from bundle.data.evaluation import FREESURFER_30, SynthSeg

    subject = SynthSeg().subject("17", tmp_path)
    original = nib.load(SHARED_DATA / "synthseg_label_maps" / "training_seg_17.nii.gz")
    label, image = subject["label_array"], subject["image_array"]
    assert label.shape == image.shape and label.shape[0] < 256
    assert set(np.unique(label)) - {0} <= set(range(1, 100)) and len(set(FREESURFER_30) & set(np.unique(label))) >= 28
    # a voxel of the crop maps through both affines to the same label in the original map
    ijk = np.argwhere(label == 17)[0]
    world = subject["affine"] @ np.r_[ijk, 1.0]
    src = np.round(np.linalg.inv(original.affine) @ world).astype(int)[:3]
    assert int(np.asarray(original.dataobj)[tuple(src)]) == 17
    assert 0.35 < float(image[label == 2].mean()) and float(image[label == 2].mean()) > float(image[label == 4].mean())
    again = SynthSeg().subject("17", tmp_path)  # reused from the work folder, not drawn again
    assert np.array_equal(again["image_array"], image)


def test_a_prior_table_gives_another_sequence_and_a_prior_above_one_stays_brightest():
    from bundle.transforms import FLAIR_MEANS

    label = _label_map()
    out = RandSynthesiseImaged("label", "image", prior=FLAIR_MEANS, gamma=(1.0, 1.0)).set_random_state(3)({"label": label})
    image = out["image"]
    wm = float(image[0, 10:22, 10:14, 10:22][out["label"][0, 10:22, 10:14, 10:22] == 2].mean())
    gm, csf = float(image[0, 5, 5:27, 5:27].mean()), float(image[out["label"] == 4].mean())
    assert gm > wm > csf, (gm, wm, csf)  # FLAIR: grey brighter than white matter, CSF suppressed
    bright = RandSynthesiseImaged("label", "image", prior={**FLAIR_MEANS, 4: 1.4}, gamma=(1.0, 1.0)).set_random_state(3)(
        {"label": label})["image"]
    assert float(bright[label == 4].mean()) > float(bright[label == 3].mean())  # not clipped down to the cortex
