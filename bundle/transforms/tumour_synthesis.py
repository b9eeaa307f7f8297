"""Synthetic brain tumours for training the tumour model: tumour regions implanted in a healthy label map, then
T1c and FLAIR images drawn from it (SynthSeg style: one random intensity per label around the sequence's
tissue ordering), with the tumour's oedema / core labels.

Healthy scans with tumour-relevant sequences are rare (LPBA40 and IBSR are T1 only); a label map gives both
sequences, any number of tumours of any size and place, and a different contrast at every draw. MONAI has no
label-to-image or tumour generator (hence our own, on :class:`RandSynthesiseImaged`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import MapTransform, RandomizableTransform

from bundle.spatial import index_grid

from .checks import source_name
from .lesion import radial_push_ddf, smooth_noise, voxel_spacing
from .synthesis import FLAIR_MEANS, FREESURFER_BRAIN_LABELS, T1_MEANS, RandSynthesiseImaged
from .warping import copy_grid_meta

__all__ = ["NECROSIS", "ENHANCING", "OEDEMA", "TUMOUR_LABELS", "RandTumourImplantd", "RandSynthesiseTumourImaged",
           "tumour_classes", "tumour_class_names"]

# label values added to a FreeSurfer / SynthSeg map (theirs are below 1000)
NECROSIS, ENHANCING, OEDEMA = 9001, 9002, 9003
TUMOUR_LABELS = (NECROSIS, ENHANCING, OEDEMA)
# cerebral white matter (FreeSurfer 2, 41): gliomas grow in it and their oedema spreads along it
WHITE_MATTER = (2, 41)


def tumour_classes(label: torch.Tensor, regions: bool = True) -> torch.Tensor:
    """Training classes of a label map with implanted tumour labels: ``regions`` -> 0 background, 1 oedema,
    2 tumour core (necrosis + enhancing), as ``bundle``'s three-class tumour model; else 0/1 whole tumour."""
    values = torch.as_tensor(label)
    core = (values == NECROSIS) | (values == ENHANCING)
    if not regions:
        return (core | (values == OEDEMA)).to(torch.int16)
    return torch.where(core, 2, torch.where(values == OEDEMA, 1, 0)).to(torch.int16)


def tumour_class_names(num_classes: int) -> tuple[str, ...]:
    """What each output class of a joint model with ``num_classes`` tumour classes means (value = index): 2 ->
    background, tumour (whole tumour); 3 -> background, oedema, tumour core (the shipped model).

    Raises:
        ValueError: another number of classes (no meaning is defined for it).
    """
    names = {2: ("background", "tumour"), 3: ("background", "oedema", "tumour core")}
    if int(num_classes) not in names:
        raise ValueError(f"a tumour model has 2 (whole tumour) or 3 (oedema, tumour core) classes, not {num_classes}.")
    return names[int(num_classes)]


class RandTumourImplantd(RandomizableTransform, MapTransform):
    """Implant a glioma-like tumour in a channel-first integer label map (FreeSurfer / SynthSeg values).

    A centre is drawn in cerebral white matter (any brain voxel when there is none). The tissue around it is
    pushed outwards first (mass effect: :func:`radial_push_ddf`, nearest neighbour, so labels stay labels).
    The tumour core is an ellipsoid with a noisy boundary (semi-axes in ``core_radius_mm``); with probability
    ``necrosis_prob`` its inner part (a random fraction of it) is necrosis (``NECROSIS``) inside an enhancing
    rim (``ENHANCING``), otherwise the whole core is ``ENHANCING`` (enhancing or not is decided by the image
    synthesis). Oedema (``OEDEMA``) surrounds the core by a random margin (``oedema_margin_mm``), in white
    matter only beyond the core's first 2 mm, as vasogenic oedema spreads along white matter and spares cortex.
    Every tumour voxel lies inside the brain (label > 0). With probability ``1 - prob`` the map is unchanged.

    Args:
        keys: label-map keys (each gets its own tumour).
        prob: probability of implanting a tumour.
        core_radius_mm: range of the core's semi-axes.
        oedema_margin_mm: range of the oedema's extent beyond the core.
        necrosis_prob: probability of a necrotic centre.
        mass_effect: range of the push strength ``k`` (0 = none, < 1 keeps the map invertible).

    Raises:
        ValueError: bad ranges, or a label map that is not integral.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        core_radius_mm: Sequence[float] = (5.0, 25.0),
        oedema_margin_mm: Sequence[float] = (0.0, 30.0),
        necrosis_prob: float = 0.6,
        mass_effect: Sequence[float] = (0.0, 0.5),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 < core_radius_mm[0] <= core_radius_mm[1]:
            raise ValueError(f"core_radius_mm must be a positive range, got {core_radius_mm}.")
        if not 0 <= oedema_margin_mm[0] <= oedema_margin_mm[1]:
            raise ValueError(f"oedema_margin_mm must be a non-negative range, got {oedema_margin_mm}.")
        if not 0 <= mass_effect[0] <= mass_effect[1] < 1:
            raise ValueError(f"mass_effect must be a range within [0, 1), got {mass_effect}.")
        if not 0 <= necrosis_prob <= 1:
            raise ValueError(f"necrosis_prob must be in [0, 1], got {necrosis_prob}.")
        self.core_radius_mm, self.oedema_margin_mm = tuple(core_radius_mm), tuple(oedema_margin_mm)
        self.necrosis_prob, self.mass_effect = necrosis_prob, tuple(mass_effect)
        self.warp = Warp(mode="nearest", padding_mode="border")

    def implant(self, label: torch.Tensor, name: str = "label map") -> torch.Tensor:
        """One tumour in one channel-first label map; returns the new map (same type, dtype and grid)."""
        values = torch.as_tensor(label).as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
        if values.is_floating_point() and (not torch.isfinite(values).all() or (values != values.round()).any()):
            raise ValueError(f"{name} must hold integer labels (found non-integer or non-finite values).")
        spatial = values.shape[1:]
        view = (-1, *([1] * len(spatial)))
        spacing = torch.as_tensor(voxel_spacing(label), dtype=torch.float32).view(view)
        region = values[0].round().to(torch.int32)  # room for the tumour labels whatever the stored dtype
        white = torch.isin(region, torch.as_tensor(WHITE_MATTER, dtype=region.dtype))
        candidates = torch.nonzero(white if white.any() else region > 0)
        if len(candidates) == 0:
            raise ValueError(f"{name} has no brain voxel (all labels 0) to implant a tumour in.")
        centre = candidates[self.R.randint(len(candidates))].to(torch.float32)
        radii = torch.as_tensor(self.R.uniform(*self.core_radius_mm, size=len(spatial)), dtype=torch.float32)
        margin = float(self.R.uniform(*self.oedema_margin_mm))

        k = float(self.R.uniform(*self.mass_effect))
        if k > 0:
            ddf = radial_push_ddf(spatial, centre, spacing.flatten(), k, float(radii.mean()) * 1.5).unsqueeze(0)
            region = self.warp(region[None, None].float(), ddf)[0, 0].round().to(torch.int32)
        brain = region > 0
        offset_mm = (index_grid(spatial) - centre.view(view)) * spacing
        distance = torch.sqrt(((offset_mm / radii.view(view)) ** 2).sum(0))  # 1 on the core's ellipsoid
        level = distance + smooth_noise(self.R, spatial, 0.2)
        core = (level < 1.0) & brain
        out = region.clone()
        if self.R.uniform() < self.necrosis_prob:
            fraction = float(self.R.uniform(0.3, 0.75))
            out[core] = ENHANCING
            out[core & (level < fraction)] = NECROSIS
        else:
            out[core] = ENHANCING
        if margin > 0:
            # the oedema's level in millimetres beyond the core, with its own irregular boundary
            beyond_mm = (level - 1.0) * float(radii.mean()) + smooth_noise(self.R, spatial, 0.3) * margin
            near = beyond_mm < 2.0
            white_now = torch.isin(region, torch.as_tensor(WHITE_MATTER, dtype=region.dtype))
            oedema = brain & ~core & (beyond_mm < margin) & (near | white_now)
            out[oedema] = OEDEMA
        dtype = values.dtype
        if not dtype.is_floating_point and torch.iinfo(dtype).max < max(TUMOUR_LABELS):
            dtype = torch.int16  # e.g. uint8 maps cannot hold the tumour labels
        out = out[None].to(dtype)
        return copy_grid_meta(out, label) if isinstance(label, MetaTensor) else out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(None)
            if self._do_transform:
                d[key] = self.implant(d[key], source_name(d, key))
        return d


class RandSynthesiseTumourImaged(RandomizableTransform, MapTransform):
    """Draw a T1c + FLAIR image (2 channels, each in [0, 1], skull-stripped) from a label map with implanted
    tumour labels (:class:`RandTumourImplantd`), and write the tumour classes (:func:`tumour_classes`).

    Each sequence is one :class:`RandSynthesiseImaged` draw (its own texture, blur, bias field, gamma and noise)
    around the tissue means of the sequence (``T1_MEANS`` for T1c, ``FLAIR_MEANS``), with the tumour's means
    drawn per image from the ranges below (the scale where T1 white matter is 0.8): oedema dark in T1c and
    bright in FLAIR; an enhancing rim bright in T1c, or, with probability ``nonenhancing_prob`` (lower-grade
    gliomas), no enhancement (the core as dark as oedema in T1c); necrosis dark in T1c and anywhere in FLAIR.

    Args:
        keys: label-map keys (values FreeSurfer / SynthSeg plus ``TUMOUR_LABELS``).
        image_keys: output image key per label key (2 channels: T1c, FLAIR).
        class_keys: output tumour-class key per label key.
        regions: tumour classes 0/1 oedema/2 core (True) or 0/1 whole tumour (False).
        nonenhancing_prob: probability of a tumour core without contrast enhancement.
        mean_jitter: standard deviation of a healthy tissue's mean around its prior.

    Raises:
        ValueError: ``image_keys`` / ``class_keys`` not one per key.
    """

    T1C_TUMOUR = {NECROSIS: (0.10, 0.35), ENHANCING: (1.00, 1.30), OEDEMA: (0.45, 0.70)}
    T1C_NONENHANCING = (0.35, 0.60)
    FLAIR_TUMOUR = {NECROSIS: (0.30, 0.90), ENHANCING: (0.55, 0.85), OEDEMA: (0.75, 1.00)}

    def __init__(
        self,
        keys: KeysCollection,
        image_keys: KeysCollection,
        class_keys: KeysCollection,
        regions: bool = True,
        nonenhancing_prob: float = 0.3,
        mean_jitter: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.image_keys = tuple([image_keys] if isinstance(image_keys, str) else image_keys)
        self.class_keys = tuple([class_keys] if isinstance(class_keys, str) else class_keys)
        if len(self.image_keys) != len(self.keys) or len(self.class_keys) != len(self.keys):
            raise ValueError(f"image_keys and class_keys must give one output per key: {self.keys} vs "
                             f"{self.image_keys}, {self.class_keys}.")
        if not 0 <= nonenhancing_prob <= 1:
            raise ValueError(f"nonenhancing_prob must be in [0, 1], got {nonenhancing_prob}.")
        self.regions, self.nonenhancing_prob = regions, nonenhancing_prob
        brain = (*FREESURFER_BRAIN_LABELS, *TUMOUR_LABELS)
        self.sequences = [RandSynthesiseImaged("l", "i", mean_jitter=mean_jitter, brain_labels=brain, prior=prior)
                          for prior in (T1_MEANS, FLAIR_MEANS)]

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for sequence in self.sequences:
            sequence.set_random_state(state=self.R)
        return self

    def _tumour_priors(self) -> list[dict[int, float]]:
        t1c = {label: float(self.R.uniform(*bounds)) for label, bounds in self.T1C_TUMOUR.items()}
        if self.R.uniform() < self.nonenhancing_prob:
            t1c[ENHANCING] = float(self.R.uniform(*self.T1C_NONENHANCING))
        flair = {label: float(self.R.uniform(*bounds)) for label, bounds in self.FLAIR_TUMOUR.items()}
        return [t1c, flair]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, image_key, class_key in zip(self.key_iterator(d), self.image_keys, self.class_keys):
            name = source_name(d, key)
            channels, label = [], None
            for sequence, base, tumour in zip(self.sequences, (T1_MEANS, FLAIR_MEANS), self._tumour_priors()):
                sequence.prior = {**base, **tumour}
                image, label = sequence.synthesise(d[key], name)
                channels.append(image[0])
            image, classes = torch.stack(channels), tumour_classes(label, self.regions)
            if isinstance(d[key], MetaTensor):
                image, classes = MetaTensor(image, meta=dict(d[key].meta)), MetaTensor(classes, meta=dict(d[key].meta))
            d[image_key], d[class_key] = image, classes
        return d
