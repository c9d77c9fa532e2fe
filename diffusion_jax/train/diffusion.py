"""Stage "diffusion": the text-conditioned UNet on latents of a frozen VAE and a frozen text encoder.

The VAE and the text encoder come from the earlier stages (the autoencoder and the CLIP text
tower) or, for fine-tuning, from a diffusers-format directory (`config.diffusion.init_from`), which
also supplies the initial UNet, the tokenizer and the noise schedule.

Per example: a posterior sample of the image's latent (scaled by `scale_latents`), a
uniform timestep, Gaussian noise, and with probability `caption_dropout` the empty caption in place
of the real one (for classifier-free guidance). The UNet predicts eps or v; the loss is the mean
squared error, optionally min-SNR-gamma weighted. Latents and text states can be computed once for
the training examples (`cache_latents`, `cache_text`) instead of at every step.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import xla_options
from diffusion_jax.convert import diffusers as dconv
from diffusion_jax.data import shapes
from diffusion_jax.diffusion import losses, schedules
from diffusion_jax.diffusion.schedules import SchedulerConfig
from diffusion_jax.nn import autoencoder as ae
from diffusion_jax.nn import unet as unet_lib
from diffusion_jax.nn.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_jax.pipeline import Pipeline
from diffusion_jax.tokenizer import CLIPTokenizer
from diffusion_jax.train import autoencoder as ae_stage
from diffusion_jax.train import clip as clip_stage
from diffusion_jax.train import data as data_lib
from diffusion_jax.train import validate


@dataclasses.dataclass
class Encoders:
  """The frozen networks of the stage and what describes them for export."""
  vae_config: ae.AutoencoderConfig
  vae_params: Any
  text_config: TextEncoderConfig
  text_params: Any
  tokenizer: CLIPTokenizer
  scheduler: SchedulerConfig
  unet_config: unet_lib.UNetConfig | None = None  # from init_from
  unet_params: Any = None  # from init_from (host arrays)


def scheduler_config(config: Any, base: SchedulerConfig | None = None) -> SchedulerConfig:
  """The training noise schedule: `base` (init_from's) or config.diffusion.scheduler, with overrides."""
  d = config.diffusion
  if base is None:
    s = d.scheduler
    base = SchedulerConfig(num_train_timesteps=int(s.num_train_timesteps), beta_start=float(s.beta_start),
                           beta_end=float(s.beta_end), beta_schedule=s.beta_schedule,
                           timestep_spacing=s.timestep_spacing, steps_offset=int(s.steps_offset),
                           rescale_betas_zero_snr=bool(s.rescale_betas_zero_snr), class_name=s.class_name)
  if d.prediction_type:
    base = dataclasses.replace(base, prediction_type=d.prediction_type)
  return base


def unet_config(config: Any, latent_channels: int, latent_size: int, context_dim: int) -> unet_lib.UNetConfig:
  """`UNetConfig(**config.diffusion.unet)` with the latent shape and the context width of the frozen encoders."""
  latents = (latent_channels, "the VAE's latent channels")
  return validate.module_config(unet_lib.UNetConfig, config.diffusion.unet, "diffusion.unet", {
      "sample_size": (latent_size, "the latent side (image_size / the VAE's downsampling factor)"),
      "in_channels": latents, "out_channels": latents,
      "cross_attention_dim": (context_dim, "the text encoder's width")})


def run_fields(cls: type, section: Any) -> dict[str, Any]:
  """The fields of `section` that apply to a pretrained model: those that leave its parameters as they are
  (dropout and what diffusers' config does not hold: remat and the implementation choices)."""
  saved = set(cls().to_diffusers())
  return {f.name: section[f.name] for f in dataclasses.fields(cls)
          if f.name in section and (f.name not in saved or f.name == "dropout")}


# ------------------------------------------------------------------------------------------ encoders


def encoders_from_directory(config: Any, configure: Callable = lambda c: c) -> Encoders:
  """VAE, text encoder, tokenizer, schedule and the initial UNet of a diffusers-format directory.

  The run's config applies what leaves the weights as they are (`run_fields`); `configure` makes the
  implementation choices of each module config.
  """
  path = config.diffusion.init_from
  components = ["vae", "text_encoder", "unet", "tokenizer"]
  if "scheduler" in dconv.available_components(dconv.find_directory(path)):
    components.append("scheduler")  # else the default schedule
  loaded = dconv.load_directory(path, components)
  vae_config = dataclasses.replace(loaded.configs["vae"], **run_fields(ae.AutoencoderConfig, config.autoencoder.model))
  unet_config_ = dataclasses.replace(loaded.configs["unet"], **run_fields(unet_lib.UNetConfig, config.diffusion.unet))
  return Encoders(configure(vae_config), loaded.params["vae"], configure(loaded.configs["text_encoder"]),
                  loaded.params["text_encoder"], loaded.tokenizer, scheduler_config(config, loaded.scheduler),
                  configure(unet_config_), loaded.params["unet"])


@functools.lru_cache(maxsize=8)
def _vae_encoder(vae_config: ae.AutoencoderConfig):
  vae = ae.AutoencoderKL(vae_config)
  return jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"),
                 compiler_options=xla_options.compiler_options())


def vae_encoder(vae_config: ae.AutoencoderConfig):
  """Jitted (params, images) -> (mean, logvar); one compilation whatever the scaling factor."""
  return _vae_encoder(dataclasses.replace(vae_config, scaling_factor=1.0))


@functools.lru_cache(maxsize=8)
def text_encoder_fn(text_config: TextEncoderConfig):
  """Jitted (params, ids) -> last hidden states [B, L, D]."""
  text = TextEncoder(text_config)
  return jax.jit(lambda p, ids: text.apply({"params": p}, ids)[0])


def estimate_scaling_factor(vae_config: ae.AutoencoderConfig, vae_params, records, mesh, batch_size: int) -> float:
  """1 / std of the posterior means of `records` (how SD's 0.18215 was chosen)."""
  encode = vae_encoder(vae_config)
  means = [np.asarray(data_lib.to_host(encode(vae_params, b["image"])[0]))[:real]
           for b, real in data_lib.eval_batches(records, batch_size, ("image",), mesh)]
  return ae.estimate_scaling_factor(jnp.asarray(np.concatenate(means)))


def encoders_from_stages(config: Any, vae_params, clip_params, mesh, configure: Callable = lambda c: c) -> Encoders:
  """The trained autoencoder and the CLIP text tower of this run; the VAE's scaling factor is estimated
  unless config.autoencoder.model sets it. `configure` makes the implementation choices of each module config."""
  vae_config = configure(ae_stage.model_config(config))
  tokenizer = clip_stage.make_tokenizer(config)
  text_config = configure(clip_stage.model_config(config, tokenizer).text)
  if config.autoencoder.model.scaling_factor is None:
    records = data_lib.read_records(data_lib.source(config, "train"),
                                    range(int(config.diffusion.scaling_examples)))
    scale = estimate_scaling_factor(vae_config, vae_params, records, mesh, int(config.diffusion.encode_batch_size))
    vae_config = dataclasses.replace(vae_config, scaling_factor=round(scale, 6))
  return Encoders(vae_config, vae_params, text_config, clip_params["text_model"], tokenizer, scheduler_config(config))


# ------------------------------------------------------------------------------------------ caching


class CachedLatents:
  """Training records of precomputed posteriors and text states: a random-access grain source."""

  def __init__(self, mean: np.ndarray, logvar: np.ndarray, contexts: np.ndarray, context_index: np.ndarray):
    self.mean, self.logvar = mean, logvar  # [N, h, w, C] each
    self.contexts, self.context_index = contexts, context_index  # [U, L, D], [N]

  def __len__(self) -> int:
    return len(self.mean)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {"latent_mean": self.mean[i], "latent_logvar": self.logvar[i],
            "context": self.contexts[self.context_index[i]]}


def _fingerprint(*trees) -> str:
  h = hashlib.sha256()
  for tree in trees:
    for x in jax.tree.leaves(tree):
      h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()[:16]


def encode_text_states(text_config: TextEncoderConfig, text_params, tokenizer, captions: list[str], mesh,
                       batch_size: int) -> np.ndarray:
  """Last hidden states [N, L, D] of the text encoder for `captions`."""
  encode = text_encoder_fn(text_config)
  records = [{"caption": c} for c in captions]
  return np.concatenate([np.asarray(data_lib.to_host(encode(text_params, b["tokens"])))[:real]
                         for b, real in data_lib.eval_batches(records, batch_size, ("tokens",), mesh,
                                                              tokenizer=tokenizer)])


def build_cache(config: Any, enc: Encoders, mesh, cache_dir: str) -> CachedLatents:
  """Posteriors of the first `cache_examples` training images and the text states of their captions.

  Stored in `cache_dir` (keyed by the frozen weights), so a restarted run reads them back.
  """
  d = config.diffusion
  src = data_lib.source(config, "train")
  n = len(src) if int(d.cache_examples) < 0 else min(int(d.cache_examples), len(src))
  key = _fingerprint(enc.vae_params, enc.text_params)
  path = os.path.join(cache_dir, f"latents-{n}-{key}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return CachedLatents(f["mean"], f["logvar"], f["contexts"], f["context_index"])

  encode = vae_encoder(enc.vae_config)
  means, logvars, captions = [], [], []
  batch_size = int(d.encode_batch_size)
  for start in range(0, n, 4 * batch_size):
    records = data_lib.read_records(src, range(start, min(start + 4 * batch_size, n)))
    captions += [r["caption"] for r in records]
    for b, real in data_lib.eval_batches(records, batch_size, ("image",), mesh):
      mean, logvar = data_lib.to_host(encode(enc.vae_params, b["image"]))
      means.append(np.asarray(mean)[:real])
      logvars.append(np.asarray(logvar)[:real])
  unique = sorted(set(captions))
  index = {c: i for i, c in enumerate(unique)}
  contexts = encode_text_states(enc.text_config, enc.text_params, enc.tokenizer, unique, mesh, batch_size)
  cache = CachedLatents(np.concatenate(means), np.concatenate(logvars), contexts,
                        np.asarray([index[c] for c in captions], np.int32))
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mean=cache.mean, logvar=cache.logvar, contexts=cache.contexts,
             context_index=cache.context_index)
    os.replace(tmp, path)
  return cache


# ------------------------------------------------------------------------------------------ loss


def posterior_latents(keys: jax.Array, mean: jax.Array, logvar: jax.Array,
                      vae_config: ae.AutoencoderConfig) -> jax.Array:
  """One draw per example ([B] keys) from the VAE posterior [B, h, w, C], scaled for the diffusion model."""
  z = mean + jnp.exp(0.5 * logvar) * ae_stage.per_example_normal(keys, mean.shape[1:])
  return ae.scale_latents(z, vae_config)


def make_loss(unet: unet_lib.UNet, vae: ae.AutoencoderKL, text: TextEncoder, scheduler: SchedulerConfig,
              cfg: Any, empty_tokens: np.ndarray):
  """`loss_fn(params, frozen, batch)`.

  batch: either latent_mean/latent_logvar [B, h, w, C] (cached) or image [B, H, W, 3]; and either
  context [B, L, D] (cached) or tokens [B, L]; plus rng [B]. frozen: {"vae", "text_encoder"} params
  as needed, and "uncond_context" [L, D] when text states are cached. Latents are scaled as
  `vae.config` says (`scale_latents`).
  """
  alphas_cumprod = jnp.asarray(schedules.alphas_cumprod(scheduler))
  num_timesteps = scheduler.num_train_timesteps
  prediction_type = scheduler.prediction_type
  drop_prob, gamma = float(cfg.caption_dropout), float(cfg.min_snr_gamma)
  use_dropout = unet.config.dropout > 0
  empty_tokens = jnp.asarray(empty_tokens, jnp.int32)  # [L]

  def loss_fn(params, frozen, batch):
    keys = jax.vmap(lambda k: jax.random.split(k, 4))(batch["rng"])  # [B, 4]
    k_post, k_time, k_noise, k_drop = keys[:, 0], keys[:, 1], keys[:, 2], keys[:, 3]
    if "latent_mean" in batch:
      mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
      mean, logvar = vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
    x0 = jax.lax.stop_gradient(posterior_latents(k_post, mean, logvar, vae.config))  # [B, h, w, C]

    drop = jax.vmap(lambda k: jax.random.uniform(k) < drop_prob)(k_drop)  # [B]
    if "context" in batch:
      context = jnp.where(drop[:, None, None], frozen["uncond_context"][None], batch["context"])
    else:
      tokens = jnp.where(drop[:, None], empty_tokens[None], batch["tokens"])
      context = text.apply({"params": frozen["text_encoder"]}, tokens)[0]
    context = jax.lax.stop_gradient(context)  # [B, L, D]

    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(k_time)  # [B]
    noise = ae_stage.per_example_normal(k_noise, x0.shape[1:])
    x_t = losses.add_noise(x0, noise, alphas_cumprod, t)
    rngs = {"dropout": jax.random.fold_in(batch["rng"][0], 1)} if use_dropout else None
    out = unet.apply({"params": params}, x_t, t, context, deterministic=not use_dropout, rngs=rngs)
    alpha, sigma = losses.alpha_sigma(alphas_cumprod, t)
    weights = None
    if gamma > 0:
      weights = losses.min_snr_weights(losses.snr(alphas_cumprod, t), gamma, prediction_type)
    per_example = losses.diffusion_loss(out, x0, noise, alpha, sigma, prediction_type, weights)
    return jnp.mean(per_example), {"caption_dropped": jnp.mean(drop.astype(jnp.float32))}

  return loss_fn


# ------------------------------------------------------------------------------------------ sampling


def make_pipeline(enc: Encoders, unet_cfg: unet_lib.UNetConfig, unet_params, dtype=jnp.float32) -> Pipeline:
  """A Pipeline over the frozen encoders and the given UNet weights (the EMA weights, for sampling)."""
  return Pipeline(tokenizer=enc.tokenizer, text_encoder=TextEncoder(enc.text_config, dtype=dtype),
                  vae=ae.AutoencoderKL(enc.vae_config, dtype=dtype), unet=unet_lib.UNet(unet_cfg, dtype=dtype),
                  params={"text_encoder": enc.text_params, "vae": enc.vae_params, "unet": unet_params},
                  scheduler=enc.scheduler,
                  configs={"text_encoder": enc.text_config, "vae": enc.vae_config, "unet": unet_cfg})


def eval_captions(config: Any, n: int) -> list[str]:
  """The captions of the first `n` test examples (alternately one and two objects)."""
  src = data_lib.source(config, "test")
  return [src[i]["caption"] for i in range(min(n, len(src)))]


def evaluate(pipe: Pipeline, captions: list[str], cfg: Any, *, score: bool) -> tuple[dict, np.ndarray]:
  """Samples one image per caption; with `score`, the `shapes` evaluator's metrics."""
  s = cfg.sample
  images = pipe(captions, num_inference_steps=int(s.steps), guidance_scale=float(s.guidance_scale),
                sampler=s.sampler, seed=int(s.seed))
  metrics = {}
  if score:
    metrics = shapes.evaluate(images, captions)["metrics"]
  return metrics, images

