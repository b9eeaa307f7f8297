from .registration import SIMILARITIES, SMOOTHNESS, RegistrationLoss, make_similarity, make_smoothness
