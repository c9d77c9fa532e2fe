"""Data: the `shapes` data set, image folders, TFDS catalog sets, and the grain pipeline.

`shapes` and `tfds_catalog` import tensorflow_datasets; import them as modules
(`from diffusion_jax.data import shapes`) when needed.
"""

from diffusion_jax.data.image_folder import ImageFolderError, ImageFolderSource
from diffusion_jax.data.pipeline import Augment, ShapesSource, get_source, make_dataset, shard
from diffusion_jax.data.transforms import resize_and_center_crop, to_rgb

__all__ = [
    "Augment",
    "ImageFolderError",
    "ImageFolderSource",
    "ShapesSource",
    "get_source",
    "make_dataset",
    "resize_and_center_crop",
    "shard",
    "to_rgb",
]
