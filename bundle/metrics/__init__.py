"""Registration evaluation metrics: DDF regularity (folding, SDlogJ), target registration error, Ignite handlers."""

from .handlers import Folding, LogJacobianStd, ddf_output_transform
from .jacobian import FoldingMetric, LogJacobianStdMetric, jacobian_determinant
from .tre import TREMetric, target_registration_error

__all__ = [
    "Folding",
    "FoldingMetric",
    "LogJacobianStd",
    "LogJacobianStdMetric",
    "TREMetric",
    "ddf_output_transform",
    "jacobian_determinant",
    "target_registration_error",
]
