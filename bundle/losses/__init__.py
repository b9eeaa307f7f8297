from .joint import MASK_SOURCES, JointRegSegLoss
from .masked_similarity import MaskedSimilarityLoss
from .registration import SIMILARITIES, SMOOTHNESS, RegistrationLoss, make_similarity, make_smoothness
