"""Synthesise an MR-like image from a label map (SynthSeg / SynthMorph style), for evaluation and training.

MONAI has no label-to-image generator; the intensity steps after the per-label draw reuse MONAI's own
``GaussianSmooth``, ``RandBiasField``, ``RandAdjustContrast`` and ``RandGaussianNoise``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    GaussianSmooth,
    MapTransform,
    RandAdjustContrast,
    RandBiasField,
    RandomizableTransform,
)

from .checks import source_name

__all__ = ["FLAIR_MEANS", "FREESURFER_30", "FREESURFER_BRAIN_LABELS", "T1_MEANS", "RandSynthesiseImaged",
           "RandSynthesisePaird"]

# Mean T1-weighted intensity per FreeSurfer label (white matter 0.8, cortex 0.5, CSF 0.15), from the
# usual T1 ordering of tissues; deep grey nuclei sit between cortex and white matter.
T1_MEANS = {
    2: 0.80, 41: 0.80, 7: 0.75, 46: 0.75, 16: 0.72, 28: 0.70, 60: 0.70, 85: 0.70,  # white-matter-like
    3: 0.50, 42: 0.50, 8: 0.52, 47: 0.52, 17: 0.48, 53: 0.48, 18: 0.50, 54: 0.50,  # cortex, hippocampus, amygdala
    10: 0.62, 49: 0.62, 11: 0.56, 50: 0.56, 12: 0.60, 51: 0.60, 13: 0.68, 52: 0.68, 26: 0.55, 58: 0.55,  # nuclei
    4: 0.15, 43: 0.15, 5: 0.15, 44: 0.15, 14: 0.15, 15: 0.15, 24: 0.18, 72: 0.15, 30: 0.30, 62: 0.30,  # CSF, vessel
    31: 0.40, 63: 0.40, 77: 0.70, 80: 0.45,  # choroid plexus, hypointensities
}
# Mean FLAIR intensity per FreeSurfer label, on the same scale: CSF suppressed (dark), grey matter brighter than
# white matter, white-matter hypointensities (lesions on T1) bright.
FLAIR_MEANS = {
    2: 0.45, 41: 0.45, 7: 0.45, 46: 0.45, 16: 0.50, 28: 0.50, 60: 0.50, 85: 0.50,  # white-matter-like
    3: 0.62, 42: 0.62, 8: 0.60, 47: 0.60, 17: 0.65, 53: 0.65, 18: 0.63, 54: 0.63,  # cortex, hippocampus, amygdala
    10: 0.52, 49: 0.52, 11: 0.58, 50: 0.58, 12: 0.55, 51: 0.55, 13: 0.48, 52: 0.48, 26: 0.58, 58: 0.58,  # nuclei
    4: 0.08, 43: 0.08, 5: 0.08, 44: 0.08, 14: 0.08, 15: 0.08, 24: 0.10, 72: 0.08, 30: 0.30, 62: 0.30,  # CSF, vessel
    31: 0.45, 63: 0.45, 77: 0.75, 80: 0.50,  # choroid plexus, hypointensities
}
# The 30 FreeSurfer structures scored in the VoxelMorph papers (``oasis/labels.npz``), short names.
FREESURFER_30 = {
    2: "L_WM", 3: "L_Cortex", 4: "L_LatVent", 7: "L_CbWM", 8: "L_CbCortex", 10: "L_Thalamus", 11: "L_Caudate",
    12: "L_Putamen", 13: "L_Pallidum", 14: "3rdVent", 15: "4thVent", 16: "BrainStem", 17: "L_Hippocampus",
    18: "L_Amygdala", 24: "CSF", 28: "L_VentralDC", 31: "L_ChoroidPlexus", 41: "R_WM", 42: "R_Cortex",
    43: "R_LatVent", 46: "R_CbWM", 47: "R_CbCortex", 49: "R_Thalamus", 50: "R_Caudate", 51: "R_Putamen",
    52: "R_Pallidum", 53: "R_Hippocampus", 54: "R_Amygdala", 60: "R_VentralDC", 63: "R_ChoroidPlexus",
}

# FreeSurfer's brain structures are the labels 1..99 (aseg); SynthSeg's maps add extra-cerebral tissue above.
FREESURFER_BRAIN_LABELS = tuple(range(1, 100))


class RandSynthesiseImaged(RandomizableTransform, MapTransform):
    """Draw an MR-like image from a channel-first label map: one random intensity per label, then texture,
    partial-volume blur, a smooth multiplicative bias field, gamma and Gaussian noise; output in [0, 1].

    ``contrast="t1"`` draws each label's mean around ``T1_MEANS`` (standard deviation ``mean_jitter``;
    labels without a prior are drawn uniformly), so images look like skull-stripped T1 scans with a
    different contrast each draw; ``prior`` replaces ``T1_MEANS`` by another sequence's table (e.g.
    ``FLAIR_MEANS``). ``contrast="random"`` draws every label's mean uniformly in [0, 1]
    (SynthMorph: contrast-agnostic). Labels outside ``brain_labels`` are set to 0 in the image *and* in
    the label map (a skull-stripped image); pass ``brain_labels=None`` to keep the whole head.

    Args:
        keys: label-map keys (channel-first integer maps, e.g. FreeSurfer labels).
        image_keys: output image key per label key.
        contrast: ``"t1"`` or ``"random"``.
        mean_jitter: standard deviation of a label's mean around its T1 prior (``contrast="t1"``).
        texture_std: range of the within-label standard deviation.
        blur_sigma: range of the partial-volume Gaussian blur, in voxels.
        bias_coeff: range of the bias field's polynomial coefficients (``RandBiasField``).
        gamma: range of the gamma exponent (``RandAdjustContrast``).
        noise_std: range of the Gaussian noise standard deviation (``RandGaussianNoise``).
        brain_labels: labels kept as brain (default FreeSurfer's 1..99); ``None`` keeps all.
        prior: mean intensity per label for ``contrast="t1"`` (default ``T1_MEANS``).

    Raises:
        ValueError: unknown ``contrast``, ``image_keys`` not one per key, or a label map that is not integral.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_keys: KeysCollection,
        contrast: str = "t1",
        mean_jitter: float = 0.05,
        texture_std: Sequence[float] = (0.0, 0.03),
        blur_sigma: Sequence[float] = (0.4, 0.9),
        bias_coeff: Sequence[float] = (0.0, 0.3),
        gamma: Sequence[float] = (0.8, 1.25),
        noise_std: Sequence[float] = (0.0, 0.03),
        brain_labels: Sequence[int] | None = FREESURFER_BRAIN_LABELS,
        prior: Mapping[int, float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.prior = dict(T1_MEANS if prior is None else prior)
        if contrast not in ("t1", "random"):
            raise ValueError(f"contrast must be 't1' or 'random', got {contrast!r}.")
        self.image_keys = tuple([image_keys] if isinstance(image_keys, str) else image_keys)
        if len(self.image_keys) != len(self.keys):
            raise ValueError(f"image_keys must give one output per key: {self.keys} vs {self.image_keys}.")
        self.contrast, self.mean_jitter = contrast, mean_jitter
        self.texture_std, self.blur_sigma = tuple(texture_std), tuple(blur_sigma)
        self.brain_labels = None if brain_labels is None else torch.as_tensor(list(brain_labels))
        self.bias = RandBiasField(coeff_range=tuple(bias_coeff), prob=1.0)
        self.gamma = RandAdjustContrast(prob=1.0, gamma=tuple(gamma))
        self.noise_std = tuple(noise_std)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.bias.set_random_state(state=self.R)
        self.gamma.set_random_state(state=self.R)
        return self

    def _means(self, labels: np.ndarray) -> np.ndarray:
        if self.contrast == "random":
            return self.R.uniform(0.0, 1.0, len(labels))
        prior = np.array([self.prior.get(int(v), np.nan) for v in labels])
        drawn = prior + self.R.normal(0.0, self.mean_jitter, len(labels))
        # no ceiling at 1: a prior above 1 (an enhancing rim) stays the brightest; the output is rescaled to [0, 1]
        return np.clip(np.where(np.isnan(prior), self.R.uniform(0.0, 1.0, len(labels)), drawn), 0.02, None)

    def synthesise(self, label: torch.Tensor, name: str = "label map") -> tuple[torch.Tensor, torch.Tensor]:
        """Image and (skull-stripped) label map from one channel-first label map."""
        values = torch.as_tensor(label).as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
        if values.is_floating_point() and (not torch.isfinite(values).all() or (values != values.round()).any()):
            raise ValueError(f"{name} must hold integer labels (found non-integer or non-finite values).")
        values = values.round().long()
        if self.brain_labels is not None:
            values = torch.where(torch.isin(values, self.brain_labels), values, torch.zeros_like(values))
        uniques, inverse = torch.unique(values, return_inverse=True)
        means = torch.as_tensor(self._means(uniques.numpy()), dtype=torch.float32)
        stds = torch.as_tensor(self.R.uniform(*self.texture_std, len(uniques)), dtype=torch.float32)
        means[uniques == 0], stds[uniques == 0] = 0.0, 0.0  # background stays black
        noise = torch.as_tensor(self.R.standard_normal(values.shape), dtype=torch.float32)
        image = means[inverse] + stds[inverse] * noise
        image = GaussianSmooth(sigma=float(self.R.uniform(*self.blur_sigma)))(image)
        image = self.bias(image, randomize=True)
        image = torch.as_tensor(self.gamma(image.clamp_min(0.0) / max(float(image.max()), 1e-6)))
        std = float(self.R.uniform(*self.noise_std))
        image = image + std * torch.as_tensor(self.R.standard_normal(values.shape), dtype=torch.float32)
        image = torch.where(values > 0, image, torch.zeros_like(image))
        scale = torch.quantile(image[values > 0][:: max(1, int((values > 0).sum()) // 1_000_000)], 0.995) if (values > 0).any() else 1.0
        image = (image / max(float(scale), 1e-6)).clamp(0.0, 1.0)
        return image, values.to(torch.int16)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        for key, image_key in zip(self.key_iterator(d), self.image_keys):
            image, label = self.synthesise(d[key], source_name(d, key))
            if isinstance(d[key], MetaTensor):
                image, label = MetaTensor(image, meta=dict(d[key].meta)), MetaTensor(label, meta=dict(d[key].meta))
            d[image_key], d[key] = image, label
        return d


class RandSynthesisePaird(RandomizableTransform, MapTransform):
    """Training pairs made of label maps only (SynthMorph-style): for an item whose ``flag_key`` is true,
    replace each image by one synthesised from its label map (:class:`RandSynthesiseImaged`, an independent
    draw per image) and map the label values to training classes; other items pass unchanged.

    A synthetic pair is listed in the datalist like any pair, with each label map as its own image and label
    (``{"moving": seg_a, "fixed": seg_b, "moving_label": seg_a, "fixed_label": seg_b, "synthesise": true}``),
    so the deterministic pre-processing (crop, orientation, spacing, padding) is shared and cached; this
    transform runs after the cache (a new image every epoch). The flag is removed, so batches of synthetic and
    real pairs collate alike.

    Args:
        keys: label-map keys, e.g. ``("moving_label", "fixed_label")`` (values as in the label maps, e.g. FreeSurfer).
        image_keys: the image key replaced for each label key, e.g. ``("moving", "fixed")``.
        flag_key: the item key marking a synthetic pair.
        label_values: label values kept as training classes ``1..len(label_values)`` in this order (others -> 0),
            e.g. the 30 FreeSurfer structures (``FREESURFER_30``); ``None`` keeps the values.
        synthesis: arguments of :class:`RandSynthesiseImaged` (``contrast``, ``mean_jitter``, ...).

    Raises:
        ValueError: ``image_keys`` not one per key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_keys: KeysCollection,
        flag_key: str = "synthesise",
        label_values: Sequence[int] | None = tuple(FREESURFER_30),
        allow_missing_keys: bool = False,
        **synthesis,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.synthesiser = RandSynthesiseImaged(keys, image_keys, allow_missing_keys=allow_missing_keys, **synthesis)
        self.flag_key = flag_key
        self.lookup = None
        if label_values is not None:
            values = [int(v) for v in label_values]
            self.lookup = torch.zeros(max(values) + 1, dtype=torch.int16)
            self.lookup[torch.as_tensor(values)] = torch.arange(1, len(values) + 1, dtype=torch.int16)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.synthesiser.set_random_state(state=self.R)
        return self

    def _classes(self, label: torch.Tensor) -> torch.Tensor:
        values = torch.as_tensor(label).long()
        inside = values.clamp(0, len(self.lookup) - 1)
        classes = torch.where(values < len(self.lookup), self.lookup[inside], torch.zeros_like(values, dtype=torch.int16))
        return classes.to(torch.int16)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if not d.pop(self.flag_key, False):
            return d
        dtypes = {key: d[key].dtype for key in self.key_iterator(d)}
        d = self.synthesiser(d)
        if self.lookup is not None:
            for key in self.key_iterator(d):
                classes = self._classes(d[key]).to(dtypes[key])  # the dtype real pairs have here (collation)
                d[key] = MetaTensor(classes, meta=dict(d[key].meta)) if isinstance(d[key], MetaTensor) else classes
        return d
