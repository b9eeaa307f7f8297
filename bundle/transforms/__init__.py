from .checks import CheckChannelsd, CheckFinited, CheckLabeld, CheckMemoryd, CheckPaird
from .foreground import above_minimum
from .warping import JacobianDeterminantd, ResampleDDFToOriginald, ResampleToOriginald, Warpd
from .spacing import PerKeySpacingd
from .lesion import RandLesionImplantd
from .channels import RandAdjustContrastPerChanneld, RandDropChanneld
from .intensity import ScaleIntensityInBraind
from .joint_output import LogitsToLabelsd, SplitJointOutputd
from .prealign import ComposePreAlignmentd, PreAlignd
from .synthesis import FREESURFER_30, RandSynthesiseImaged, RandSynthesisePaird
from .refinement import RefineNatived
