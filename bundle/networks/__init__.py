from .blocks import DEFORMATIONS, ConvDecoder, ConvEncoder, DeformationHead, upsample_field
from .registration_unet import VM1_CHANNELS, VM2_CHANNELS, RegistrationUNet, check_pair_input
from .voxelmorph_package import VXM_PACKAGE_FEATURES, VoxelMorphPackageNet
from .joint import MERGES, JointRegSegNet, TumourSegmentationNet, merge_features, split_joint_output
