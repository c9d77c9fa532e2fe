"""diffusion_jax: Stable-Diffusion-style latent text-to-image generation in JAX and Flax.

  import diffusion_jax as dj
  pipe = dj.Pipeline.from_pretrained("runs/default")        # or a diffusers-format SD 1.x/2.x directory
  images = pipe("a large red circle on the left", num_inference_steps=20)   # uint8 [N, H, W, 3]
"""
import importlib

# Imported on first use, so that `import diffusion_jax.<module>` does not pay for JAX and Flax up front.
_EXPORTS = {"Pipeline": "diffusion_jax.pipeline", "CLIPTokenizer": "diffusion_jax.tokenizer",
            "load_component": "diffusion_jax.convert.diffusers", "save_component": "diffusion_jax.convert.diffusers",
            "UnsafeCheckpointError": "diffusion_jax.convert.diffusers",
            "WeightMismatchError": "diffusion_jax.convert.keys", "jit": "diffusion_jax.xla_options"}

__all__ = ["Pipeline", "CLIPTokenizer", "load_component", "save_component", "UnsafeCheckpointError",
           "WeightMismatchError", "jit"]
__version__ = "0.1.0"


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'diffusion_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))
