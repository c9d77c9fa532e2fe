"""Data: the `shapes` data set, image folders, TFDS catalog sets, and the grain pipeline.

`shapes` and `tfds_catalog` import tensorflow_datasets; import them as modules
(`from diffusion_jax.data import shapes`) when needed. `shapes_spec` (captions,
palette) and `shapes_eval` (the evaluator) do not.
"""

from diffusion_jax.data.image_folder import ImageFolderError, ImageFolderSource
from diffusion_jax.data.pipeline import ShapesSource, get_source, make_dataset, shard
from diffusion_jax.data.transforms import (
    as_rgb_uint8, resize_center_crop, to_model_pixels, to_rgb, to_uint8)

__all__ = [
    "ImageFolderError",
    "ImageFolderSource",
    "ShapesSource",
    "as_rgb_uint8",
    "get_source",
    "make_dataset",
    "resize_center_crop",
    "shard",
    "to_model_pixels",
    "to_rgb",
    "to_uint8",
]
