"""groundmill: pixel-grounded training data for segmentation MLLMs, made by one streaming Ray pipeline."""

__version__ = "0.1.0"
