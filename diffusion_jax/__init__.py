"""diffusion_jax: Stable-Diffusion-style latent text-to-image generation in JAX and Flax.

  import diffusion_jax as dj
  pipe = dj.Pipeline.from_pretrained("runs/default")        # or a diffusers-format SD 1.x/2.x directory
  images = pipe("a large red circle on the left", num_inference_steps=20)   # uint8 [N, H, W, 3]
"""
from diffusion_jax.convert.diffusers import UnsafeCheckpointError, load_component, save_component
from diffusion_jax.convert.keys import WeightMismatchError
from diffusion_jax.pipeline import Pipeline
from diffusion_jax.tokenizer import CLIPTokenizer

__all__ = ["Pipeline", "CLIPTokenizer", "load_component", "save_component", "UnsafeCheckpointError",
           "WeightMismatchError"]
__version__ = "0.1.0"
