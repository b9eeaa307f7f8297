"""MONAI Label app for this bundle (MONAI Label loads main.py from this folder; see docs/monailabel.md)."""
