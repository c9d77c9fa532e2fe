"""The Pipeline's seams: the class named in model_index.json, conditioning pieces, latent scaling."""
import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from tests.sd_fixtures import build_sd_directory


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  return build_sd_directory(str(tmp_path_factory.mktemp("sd1")), style="sd1")


def _with_class(sd_dir, tmp_path, name):
  copy = tmp_path / "model"
  shutil.copytree(sd_dir, copy)
  index = json.loads((copy / "model_index.json").read_text())
  index["_class_name"] = name
  (copy / "model_index.json").write_text(json.dumps(index))
  return copy


def test_the_class_in_model_index_picks_the_pipeline(sd_dir, tmp_path):
  import diffusion_jax as dj
  from diffusion_jax import pipeline
  pipe = dj.Pipeline.from_pretrained(_with_class(sd_dir, tmp_path, "StableDiffusionImg2ImgPipeline"))
  assert type(pipe) is pipeline.PIPELINES["StableDiffusionImg2ImgPipeline"]


def test_an_unsupported_class_is_refused_by_name(sd_dir, tmp_path):
  import diffusion_jax as dj
  with pytest.raises(ValueError, match="holds a StableDiffusionXLPipeline, which this version does not implement"):
    dj.Pipeline.from_pretrained(_with_class(sd_dir, tmp_path, "StableDiffusionXLPipeline"))


@dataclasses.dataclass(frozen=True)
class OutputShift:
  """A toy conditioning: the call's `shift` (one per image) is added to the UNet's output."""
  arguments: tuple = ("shift",)

  def inputs(self, pipe, prompts, negatives, kwargs):
    shift = jnp.full((len(prompts), 1, 1, 1), kwargs["shift"], jnp.float32)
    return {"shift": shift}, {"shift": jnp.zeros_like(shift)}

  def wrap(self, net_fn, params):
    def shifted(x, t, cond, **unet_kwargs):
      return net_fn(x, t, cond, **unet_kwargs) + cond["shift"]
    return shifted


def test_a_conditioning_plugs_in_without_touching_the_call(sd_dir):
  import diffusion_jax as dj
  from diffusion_jax.pipeline import TextConditioning
  plain = dj.Pipeline.from_pretrained(sd_dir)
  kwargs = dict(num_inference_steps=3, sampler="ddim", seed=3, guidance_scale=1.0, output_type="np")
  with pytest.raises(TypeError, match="unexpected keyword argument.*shift"):
    plain("a cat", shift=0.0, **kwargs)
  shifted = dj.Pipeline.from_pretrained(sd_dir)
  shifted.conditionings = (TextConditioning(), OutputShift())
  np.testing.assert_allclose(shifted("a cat", shift=0.0, **kwargs), plain("a cat", **kwargs), atol=1e-6)
  # A shifted noise prediction moves DDIM's x0 estimate, so the image changes.
  assert np.abs(shifted("a cat", shift=0.5, **kwargs) - plain("a cat", **kwargs)).max() > 1e-2
  # With guidance, the unconditional branch gets its own entries (no shift there).
  guided = shifted("a cat", shift=0.0, **{**kwargs, "guidance_scale": 3.0})
  np.testing.assert_allclose(guided, plain("a cat", **{**kwargs, "guidance_scale": 3.0}), atol=1e-6)


def test_latents_are_scaled_as_the_vae_config_says(sd_dir):
  import diffusion_jax as dj
  from diffusion_jax.nn import autoencoder as ae
  pipe = dj.Pipeline.from_pretrained(sd_dir)
  image = (np.random.default_rng(0).random((1, 16, 16, 3)) * 255).astype(np.uint8)
  kwargs = dict(num_inference_steps=4, sampler="ddim", image=image, strength=0.5, guidance_scale=1.0,
                output_type="np")
  base = pipe("a cat", **kwargs)
  shifted_cfg = dataclasses.replace(pipe.configs["vae"], shift_factor=0.3)
  pipe.configs["vae"] = shifted_cfg
  pipe._compiled.clear()
  shifted = pipe("a cat", **kwargs)
  # The shift changes what the UNet sees, so the image changes; scale_latents and unscale_latents are
  # inverses, so the pipeline's decode of its own encode is unchanged with a strength that runs no step.
  assert np.abs(shifted - base).max() > 1e-3
  z = jnp.ones((1, 2, 2, 4))
  np.testing.assert_allclose(ae.unscale_latents(ae.scale_latents(z, shifted_cfg), shifted_cfg), z, atol=1e-6)
