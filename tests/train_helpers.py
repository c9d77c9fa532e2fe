"""Tiny models, batches and step runners shared by the training tests."""
import dataclasses
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.data.transforms import to_model_pixels
from diffusion_jax.diffusion.schedules import SchedulerConfig
from diffusion_jax.nn import autoencoder as ae
from diffusion_jax.nn import unet as unet_lib
from diffusion_jax.nn.text_encoder import TextEncoder
from diffusion_jax.train import clip as clip_stage
from diffusion_jax.train import diffusion as diffusion_stage
from diffusion_jax.train import optim
from diffusion_jax.train import state as state_lib
from diffusion_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from configs import default as default_config  # noqa: E402

TINY_VAE = ae.AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                sample_size=16, scaling_factor=1.0, mid_block_add_attention=False)


def init_params(module, *inputs, seed=0, **kwargs):
  """Unboxed parameters of `module` (jit-compiled init: faster than op by op)."""
  return jax.jit(lambda k: nn.meta.unbox(module.init(k, *inputs, **kwargs)["params"]))(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def shapes_images(n, size=16):
  """n `shapes` test images resized to size x size, float32 in [-1, 1], and their captions."""
  from PIL import Image
  images, captions = [], []
  for i in range(n):
    ex = shapes.generate_example("test", i)
    images.append(np.asarray(Image.fromarray(ex["image"]).resize((size, size), Image.BOX)))
    captions.append(ex["caption"])
  return to_model_pixels(np.stack(images)), tuple(captions)


def training_cfg(**overrides):
  cfg = default_config.training(steps=20, batch_size=4, learning_rate=3e-3, warmup_steps=0)
  cfg.update(overrides)
  return cfg


def fixed_keys(batch_size, seed=123):
  return jax.random.split(jax.random.key(seed), batch_size)


def run_steps(loss_fn, params, batch, steps, *, frozen=None, lr=3e-3, microbatches=1, ema_decay=0.0):
  """`steps` jitted train steps on one batch; returns (state, last metrics)."""
  tx = optim.make_optimizer(training_cfg(learning_rate=lr, steps=steps))
  state = state_lib.create(params, tx, use_ema=ema_decay > 0, frozen=frozen)
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, microbatches=microbatches, ema_decay=ema_decay))
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(0))
  return state, metrics


def loss_at(loss_fn, params, frozen, batch):
  """The loss with fixed per-example keys, so that values before and after training compare."""
  b = dict(batch, rng=fixed_keys(step_lib.batch_size_of(batch)))
  return float(jax.jit(lambda p, f, b: loss_fn(p, f, b)[0])(params, frozen, b))


@functools.lru_cache(maxsize=None)
def vae_setup():
  """(model, params, batch of 4 images 16x16, stage cfg with 8x8 crops)."""
  model = ae.AutoencoderKL(TINY_VAE)
  params = init_params(model, jnp.zeros((1, 16, 16, 3)), sample_posterior=False)
  images, _ = shapes_images(4)
  cfg = training_cfg(l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6, crop_size=8)
  return model, params, {"image": jnp.asarray(images)}, cfg


def small_clip_config(width=32):
  config = default_config.get_config()
  config.data.image_size = 16
  config.clip.model.text.update(hidden_size=width, intermediate_size=4 * width, num_layers=1, num_heads=2)
  config.clip.model.vision.update(hidden_size=width, intermediate_size=4 * width, num_layers=1, num_heads=2,
                                  patch_size=8)
  config.clip.model.projection_dim = width
  return config


@functools.lru_cache(maxsize=None)
def diffusion_setup(cached: bool, prediction_type: str = "epsilon", min_snr_gamma: float = 5.0):
  """(loss_fn, unet params, frozen, batch) of a tiny UNet on a tiny random VAE and text encoder."""
  vae = ae.AutoencoderKL(dataclasses.replace(TINY_VAE, scaling_factor=0.5))
  vae_params = init_params(vae, jnp.zeros((1, 16, 16, 3)), seed=1, sample_posterior=False)
  config = default_config.get_config()
  tokenizer = clip_stage.make_tokenizer(config)
  text_cfg = dataclasses.replace(clip_stage.model_config(config, tokenizer).text, hidden_size=16,
                                 intermediate_size=32, num_layers=1, num_heads=2)
  text = TextEncoder(text_cfg)
  text_params = init_params(text, jnp.zeros((1, 16), jnp.int32), seed=2)
  unet_cfg = unet_lib.UNetConfig(sample_size=8, block_out_channels=(16,), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                 attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8)
  unet = unet_lib.UNet(unet_cfg)
  params = init_params(unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 16, 16)), seed=3)
  cfg = training_cfg(caption_dropout=0.25, min_snr_gamma=min_snr_gamma)
  sched = SchedulerConfig(prediction_type=prediction_type)
  images, captions = shapes_images(4)
  tokens = tokenizer(list(captions))
  empty = tokenizer([""])[0]
  frozen = {}
  if cached:
    encode = diffusion_stage.vae_encoder(TINY_VAE)
    mean, logvar = encode(vae_params, jnp.asarray(images))
    text_fn = diffusion_stage.text_encoder_fn(text_cfg)
    context = text_fn(text_params, jnp.asarray(tokens))
    frozen["uncond_context"] = text_fn(text_params, jnp.asarray(empty[None]))[0]
    batch = {"latent_mean": mean, "latent_logvar": logvar, "context": context}
  else:
    frozen.update(vae=vae_params, text_encoder=text_params)
    batch = {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens)}
  loss_fn = diffusion_stage.make_loss(unet, vae, text, sched, cfg, empty)
  return loss_fn, params, frozen, batch
