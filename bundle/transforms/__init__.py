from .checks import CheckFinited, CheckLabeld, CheckPaird
from .warping import JacobianDeterminantd, ResampleDDFToOriginald, Warpd
from .spacing import PerKeySpacingd
