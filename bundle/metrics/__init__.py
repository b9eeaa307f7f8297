"""Registration evaluation metrics: DDF regularity (folding, SDlogJ), target registration error, Ignite handlers."""

from .handlers import (
    Folding,
    LogJacobianStd,
    PhysicalHausdorffDistance,
    PhysicalHausdorffDistanceMetric,
    RegistrationObjective,
    ddf_output_transform,
)
from .objective import RegistrationObjectiveMetric
from .jacobian import FoldingMetric, LogJacobianStdMetric, jacobian_determinant
from .regions import (
    REGIONS,
    endpoint_error_by_region,
    region_registration_metrics,
    tumour_regions,
)
from .tre import TREMetric, target_registration_error

__all__ = [
    "Folding",
    "FoldingMetric",
    "LogJacobianStd",
    "LogJacobianStdMetric",
    "PhysicalHausdorffDistance",
    "PhysicalHausdorffDistanceMetric",
    "REGIONS",
    "RegistrationObjective",
    "RegistrationObjectiveMetric",
    "TREMetric",
    "ddf_output_transform",
    "endpoint_error_by_region",
    "jacobian_determinant",
    "region_registration_metrics",
    "target_registration_error",
    "tumour_regions",
]
