"""Where the bundle and its weights are, and its configs read for MONAI Label: what every task of the app shares.

The app's ``--conf`` options (``monailabel start_server ... --conf KEY VALUE``):

- ``bundle_root``: the bundle (a folder with ``configs/``); default: the repository that holds this app.
- ``model``: the joint model's checkpoint (tumour segmentation and training start from it); default: the
  shipped tumour model (``ckpt_path`` of ``inference.json`` + ``joint.json`` + ``tumour.json``; it takes T1c and
  FLAIR stacked as 2 channels: one 4-D NIfTI per image in the datastore). The configs that build its network
  are chosen from its parameters (``joint.json`` for a one-channel T1 joint model, ``joint.json`` +
  ``tumour.json`` for the tumour model), for the infer task and for the train task alike.
- ``atlas_model``: the checkpoint of the atlas registration task; default: ``inference.json``'s ``ckpt_path`` (the
  shipped registration model for plain, tumour-free pairs). A joint or other registration checkpoint also works:
  the configs that build its network are chosen from its parameters.
- ``overrides``: JSON object of config ids set in every config the app reads, e.g. ``'{"pixdim": [4, 4, 4]}'``
  for a checkpoint trained at 4 mm (the network grid must match the one the weights were trained on).
- ``atlas_image`` / ``atlas_label``: the atlas of the registration task (default: the embedded demo's).
- ``atlas_brain_mask``: a brain mask on ``atlas_image``'s grid, for an atlas that is not skull-stripped (applied to
  it on every request; the demo atlas needs none).
- ``atlas_label_names``: JSON object ``{"name": value}`` naming the atlas labels.

The train task publishes its best model to ``<app>/model/trained_model.pt``; the infer tasks use it once it
exists (MONAI Label reloads a checkpoint whose modification time changed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from bundle.configs import TUMOUR_CONFIGS, checkpoint_overlays, read_config  # the bundle's config plumbing
from bundle.transforms import tumour_class_names

__all__ = ["AppSettings", "read_config", "read_metadata", "TRAINED_MODEL"]

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINED_MODEL = "trained_model.pt"
METADATA_OVERLAY = "monailabel_metadata.json"


@dataclass(frozen=True)
class AppSettings:
    """Paths and config overrides of one app instance (see the module docstring for the ``--conf`` keys)."""

    app_dir: Path
    bundle_root: Path
    model: Path
    atlas_model: Path | None = None
    overrides: dict = field(default_factory=dict)
    atlas_image: str | None = None
    atlas_label: str | None = None
    atlas_label_names: dict | None = None
    atlas_brain_mask: str | None = None

    @property
    def trained_model(self) -> Path:
        """Where the train task publishes its best model (preferred by the infer tasks once it exists)."""
        return self.app_dir / "model" / TRAINED_MODEL

    @property
    def model_paths(self) -> list[str]:
        """Checkpoints in MONAI Label's order: the last one that exists is used."""
        return [str(self.model), str(self.trained_model)]

    def joint_overlays(self, base: str) -> list[str]:
        """The overlays of ``base`` (``"inference.json"`` or ``"train.json"``) that build the network of the app's
        joint model (the last existing of :attr:`model_paths`): ``["joint.json"]`` for a T1 joint model,
        ``["joint.json", "tumour.json"]`` for the shipped tumour model.

        Raises:
            FileNotFoundError, ValueError: no checkpoint, or one that no joint network of the bundle takes.
        """
        from bundle.engines.checkpoints import network_state_dict

        existing = [p for p in self.model_paths if Path(p).is_file()]
        if not existing:
            raise FileNotFoundError(f"no joint-model checkpoint: none of {self.model_paths} exists (set --conf model).")
        state = network_state_dict(existing[-1])
        overlays = checkpoint_overlays(self.bundle_root, [base], state, registration_only=False, path=existing[-1])
        return overlays

    def segmentation_configs(self) -> tuple[str, ...]:
        """The bundle's single-image segmentation configs for the app's joint model (its architecture overlays chosen
        from its parameters), with MONAI Label's post-processing (no file writer)."""
        return ("inference.json", *self.joint_overlays("inference.json"), "inference_segmentation.json",
                "monailabel_infer.json")

    def tumour_labels(self) -> dict[str, int]:
        """``{name: value}`` of the app's joint model's segmentation (``bundle.transforms.tumour_class_names``):
        oedema 1 and tumour core 2 for the shipped tumour model, tumour 1 for a one-class model."""
        parser = read_config(self.bundle_root, self.segmentation_configs(), self.overrides)
        classes = tumour_class_names(parser.get_parsed_content("num_tumour_classes"))
        return {name: value for value, name in enumerate(classes) if value > 0}

    @classmethod
    def from_conf(cls, app_dir: str | os.PathLike, conf: dict) -> AppSettings:
        """Read the ``--conf`` options.

        Raises:
            FileNotFoundError: ``bundle_root`` has no ``configs/inference.json``; an atlas file is missing.
            ValueError: ``overrides`` or ``atlas_label_names`` is not a JSON object; only one of
                ``atlas_image`` / ``atlas_label`` is given; ``atlas_brain_mask`` without ``atlas_image``.
        """
        root = Path(os.path.expanduser(conf.get("bundle_root", str(REPO_ROOT)))).resolve()
        if not (root / "configs" / "inference.json").is_file():
            raise FileNotFoundError(f"bundle_root {root} has no configs/inference.json (set --conf bundle_root).")
        overrides = _json_object(conf, "overrides") or {}
        model = conf.get("model") or read_config(root, TUMOUR_CONFIGS, overrides).get_parsed_content("ckpt_path")
        model = Path(os.path.expanduser(str(model))).resolve()
        atlas_model = conf.get("atlas_model") or read_config(root, ("inference.json",), overrides).get_parsed_content("ckpt_path")
        atlas_model = Path(os.path.expanduser(str(atlas_model))).resolve()
        atlas = [conf.get("atlas_image"), conf.get("atlas_label")]
        if any(atlas) and not all(atlas):
            raise ValueError("give both --conf atlas_image and --conf atlas_label, or neither (the demo atlas).")
        atlas_brain_mask = conf.get("atlas_brain_mask") or None
        if atlas_brain_mask and not atlas[0]:
            raise ValueError("--conf atlas_brain_mask is the brain mask of --conf atlas_image: give both (the demo atlas "
                             "is skull-stripped).")
        for path in filter(None, [*atlas, atlas_brain_mask]):
            if not Path(path).is_file():
                raise FileNotFoundError(f"atlas file not found: {path}")
        return cls(
            app_dir=Path(app_dir).resolve(),
            bundle_root=root,
            model=model,
            atlas_model=atlas_model,
            overrides=overrides,
            atlas_image=atlas[0],
            atlas_label=atlas[1],
            atlas_label_names=_json_object(conf, "atlas_label_names"),
            atlas_brain_mask=atlas_brain_mask,
        )


def _json_object(conf: dict, key: str) -> dict | None:
    text = conf.get(key)
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--conf {key} must be a JSON object, got {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"--conf {key} must be a JSON object, got {text!r}.")
    return value


def read_metadata(bundle_root: str | os.PathLike) -> dict:
    """``configs/metadata.json`` with the MONAI Label overlay (the segmentation head's input and output) applied."""
    configs = Path(bundle_root) / "configs"
    metadata = json.loads((configs / "metadata.json").read_text())
    metadata.update(json.loads((configs / METADATA_OVERLAY).read_text()))
    return metadata
