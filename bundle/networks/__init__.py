from .blocks import DEFORMATIONS, ConvDecoder, ConvEncoder, DeformationHead, upsample_field
from .registration_unet import VM1_CHANNELS, VM2_CHANNELS, RegistrationUNet, check_pair_input
from .voxelmorph_package import VXM_PACKAGE_FEATURES, VoxelMorphPackageNet
from .downsampled import DownsampledNetwork
from .outputs import join_ddf, pack_joint_output, split_ddf, split_joint_output
from .joint import MERGES, JointRegSegNet, TumourSegmentationNet, logits_to_labels, merge_features
from .conditioning import ConditionedJointRegSegNet, ConditionedRegistrationUNet, FiLM, regularisation_code
from .probabilistic import GaussianFeatures, ProbabilisticRegistrationUNet, gaussian_kl
from .searched import (OPERATIONS, MixedOperation, SearchableRegistrationUNet, SearchedRegistrationUNet, block_count,
                       make_operation, read_genotype)
