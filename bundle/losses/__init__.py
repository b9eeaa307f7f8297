from .joint import MASK_SOURCES, JointRegSegLoss
from .masked_similarity import MaskedSimilarityLoss, consistency_mask
from .registration import SIMILARITIES, SMOOTHNESS, RegistrationLoss, make_similarity, make_smoothness
from .feature_kl import FeatureKLLoss
from .fixed_target_lncc import FixedTargetLNCCLoss, box_sum
