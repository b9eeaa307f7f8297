"""MONAI Label app for the brain registration / tumour segmentation bundle (tasks, trainers, helpers)."""
