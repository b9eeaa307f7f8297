from .registration_unet import VM1_CHANNELS, VM2_CHANNELS, RegistrationUNet, upsample_field
