"""Stage "autoencoder": the KL autoencoder, trained for reconstruction with a small KL weight.

loss = l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 + kl_weight * KL / (H * W * 3)

KL is per image, divided by the number of image elements so that kl_weight has the meaning it
has in latent diffusion (reconstruction summed over pixels + kl_weight * KL). The evaluation
reports PSNR of the posterior-mean reconstructions of test images, quantised to uint8.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import xla_options
from diffusion_jax.data.transforms import to_uint8
from diffusion_jax.nn import autoencoder as ae
from diffusion_jax.train import data as data_lib
from diffusion_jax.train import validate


def model_config(config: Any) -> ae.AutoencoderConfig:
  """`AutoencoderConfig(**config.autoencoder.model)`, its image size the data's.

  An unset scaling factor is 1 here; the diffusion stage estimates it from the trained encoder.
  """
  m = config.autoencoder.model
  image_size = int(config.data.image_size)
  scaling = {} if m.scaling_factor is not None else {"scaling_factor": 1.0}
  return validate.module_config(ae.AutoencoderConfig, m, "autoencoder.model",
                                {"sample_size": (image_size, "config.data.image_size")}, **scaling)


def init_fn(model: ae.AutoencoderKL, image_size: int):
  """rng -> boxed params (with logical axis names)."""
  def init(rng):
    return model.init(rng, jnp.zeros((1, image_size, image_size, model.config.in_channels)),
                      sample_posterior=False)["params"]
  return init


def per_example_normal(keys: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """One standard normal draw of `shape` per key: [B] keys -> [B, *shape]."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def random_crops(images: jax.Array, keys: jax.Array, size: int) -> jax.Array:
  """One random size x size crop per image: [B, H, W, C], [B] keys -> [B, size, size, C]."""
  def crop(image, key):
    ky, kx = jax.random.split(key)
    y = jax.random.randint(ky, (), 0, image.shape[0] - size + 1)
    x = jax.random.randint(kx, (), 0, image.shape[1] - size + 1)
    return jax.lax.dynamic_slice(image, (y, x, 0), (size, size, image.shape[2]))
  return jax.vmap(crop)(images, keys)


def make_loss(model: ae.AutoencoderKL, cfg: Any):
  """The stage's `loss_fn(params, frozen, batch)`; batch: image [B, H, W, 3] in [-1, 1], rng [B].

  With `cfg.crop_size` > 0 the autoencoder trains on random crops of that side (it is
  convolutional, so it still reconstructs whole images; a quarter of the pixels is four times
  faster per example).
  """
  l1_weight, l2_weight, kl_weight = float(cfg.l1_weight), float(cfg.l2_weight), float(cfg.kl_weight)
  crop_size = int(cfg.crop_size)

  def loss_fn(params, frozen, batch):
    del frozen
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(batch["rng"])  # [B, 2]
    x = batch["image"]
    if 0 < crop_size < x.shape[1]:
      x = random_crops(x, keys[:, 0], crop_size)  # [B, s, s, 3]
    mean, logvar = model.apply({"params": params}, x, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * per_example_normal(keys[:, 1], mean.shape[1:])
    recon = model.apply({"params": params}, z, method="decode")
    err = recon - x.astype(jnp.float32)
    l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    kl = jnp.mean(ae.kl_divergence(mean, logvar)) / np.prod(x.shape[1:])
    loss = l1_weight * l1 + l2_weight * l2 + kl_weight * kl
    # Per-image PSNR, averaged as in `psnr` below (and so exactly over micro-batches); [-1, 1] has range 2.
    per_image = jnp.mean(jnp.square(err), axis=(1, 2, 3))  # [B]
    psnr_mean = jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(per_image, 1e-10)))
    return loss, {"l1": l1, "mse": l2, "kl_per_element": kl, "psnr": psnr_mean}

  return loss_fn


def reconstruct(model: ae.AutoencoderKL, params, images):
  """Posterior-mean reconstructions: [B, H, W, 3] in [-1, 1] -> same."""
  mean, _ = model.apply({"params": params}, images, method="encode")
  return model.apply({"params": params}, mean, method="decode")


def psnr(reference: np.ndarray, images: np.ndarray) -> dict[str, float]:
  """PSNR of uint8 images: the mean of per-image values, and from the pooled mean squared error."""
  err = np.square(reference.astype(np.float64) - images.astype(np.float64))
  per_image = err.reshape(len(err), -1).mean(axis=1)
  return {"psnr": float(np.mean(10 * np.log10(255.0**2 / np.maximum(per_image, 1e-10)))),
          "psnr_pooled": float(10 * np.log10(255.0**2 / max(per_image.mean(), 1e-10)))}


def make_reconstruct(model: ae.AutoencoderKL):
  """Jitted (params, images) -> posterior-mean reconstructions."""
  return jax.jit(functools.partial(reconstruct, model), compiler_options=xla_options.compiler_options())


def evaluate(recon_fn, params, records, mesh, batch_size: int):
  """PSNR of the reconstructions of `records` (test images): (metrics, (originals, reconstructions))."""
  outputs = []
  for batch, real in data_lib.eval_batches(records, batch_size, ("image",), mesh):
    outputs.append(to_uint8(data_lib.to_host(recon_fn(params, batch["image"]))[:real]))
  originals = np.stack([r["image"] for r in records])
  outputs = np.concatenate(outputs)
  return psnr(originals, outputs), (originals, outputs)
