"""MONAI Label train task of the app."""

from .joint_training import JointTraining

__all__ = ["JointTraining"]
