"""Data sets as `datasets.Dataset` objects, their validation, and training-time augmentation."""
