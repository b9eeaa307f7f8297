from .checks import CheckChannelsd, CheckFinited, CheckLabeld, CheckMemoryd, CheckPaird
from .foreground import above_minimum
from .warping import JacobianDeterminantd, ResampleDDFToOriginald, ResampleToOriginald, Warpd
from .spacing import PerKeySpacingd
from .lesion import RandLesionImplantd
from .channels import RandAdjustContrastPerChanneld, RandDropChanneld
from .intensity import ApplyBrainMaskd, ScaleIntensityInBraind
from .joint_output import LogitsToLabelsd, SplitJointOutputd
from .prealign import ComposePreAlignmentd, PreAlignd
from .synthesis import FLAIR_MEANS, FREESURFER_30, RandSynthesiseImaged, RandSynthesisePaird
from .tumour_synthesis import RandSynthesiseTumourImaged, RandTumourImplantd, tumour_class_names, tumour_classes
from .refinement import RefineNatived
