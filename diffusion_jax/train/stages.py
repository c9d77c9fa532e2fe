"""The stages of a run, in one table: name -> builder (model, loss, data, frozen networks, evaluation as a
`loop.Stage`) and the checkpoint item its trained network is saved as, which later stages read."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import hardware, parallel
from diffusion_jax.nn import clip as clip_nn
from diffusion_jax.nn import unet as unet_lib
from diffusion_jax.nn.autoencoder import AutoencoderKL
from diffusion_jax.nn.text_encoder import TextEncoder
from diffusion_jax.train import autoencoder as ae_stage
from diffusion_jax.train import clip as clip_stage
from diffusion_jax.train import data as data_lib
from diffusion_jax.train import diffusion as diffusion_stage
from diffusion_jax.train import export as export_lib
from diffusion_jax.train.loop import Run, Stage, image_grid


def carried_components(config: Any, stage: str) -> tuple[str, ...]:
  """Checkpoint items of the stages before `stage` (what it and later checkpoints carry along)."""
  before = list(config.stages)[:list(config.stages).index(stage)]
  return tuple(REGISTRY[s].component for s in before)


def _test_records(config: Any, n: int) -> list[dict]:
  src = data_lib.source(config, "test")
  return data_lib.read_records(src, range(min(int(n), len(src))))


def _seed(config: Any, stage: str) -> int:
  return int(config.seed) * 1000 + list(REGISTRY).index(stage) + 1  # a different data order per stage


def _configure(run: Run, module_config):
  """`module_config` with its "auto" implementation choices made for the run's devices and compute dtype."""
  return hardware.configure(module_config, list(run.mesh.devices.flat), jnp.dtype(run.config.dtype))


def build_autoencoder(run: Run, carried: dict) -> Stage:
  config, cfg = run.config, run.config.autoencoder
  model = AutoencoderKL(_configure(run, ae_stage.model_config(config)), dtype=jnp.dtype(config.dtype))
  records = _test_records(config, cfg.eval_examples)
  recon_fn = ae_stage.make_reconstruct(model)

  def evaluate(state, step, final):
    metrics, (originals, outputs) = ae_stage.evaluate(recon_fn, state.params, records, run.mesh,
                                                      int(cfg.eval_batch_size))
    n = min(8, len(records))
    run.writer.image("autoencoder_reconstructions", step, image_grid(
        np.concatenate([originals[:n], outputs[:n], originals[n:2 * n], outputs[n:2 * n]]), columns=n))
    return metrics

  return Stage(
      cfg=cfg, init_fn=ae_stage.init_fn(model, int(config.data.image_size)), loss_fn=ae_stage.make_loss(model, cfg),
      batch_fields=("image",),
      make_iterator=lambda: data_lib.train_iterator(config, cfg, seed=_seed(config, "autoencoder")),
      evaluate=evaluate)


def build_clip(run: Run, carried: dict) -> Stage:
  config, cfg = run.config, run.config.clip
  tokenizer = clip_stage.make_tokenizer(config)
  model = clip_nn.CLIP(_configure(run, clip_stage.model_config(config, tokenizer)), dtype=jnp.dtype(config.dtype),
                       remat=bool(cfg.remat))
  records = _test_records(config, cfg.eval_examples)
  encoders = clip_stage.make_encoders(model)

  def train_records():
    records = data_lib.source(config, "train")
    if int(cfg.max_objects) > 0:
      records = clip_stage.max_objects_subset(records, "train", int(cfg.max_objects))
    return records

  def evaluate(state, step, final):
    return clip_stage.evaluate(encoders, state.params, tokenizer, records, run.mesh,
                               batch_size=int(cfg.eval_batch_size), templates=cfg.zero_shot_templates)

  return Stage(
      cfg=cfg, init_fn=clip_stage.init_fn(model),
      loss_fn=clip_stage.make_loss(model, bool(cfg.mask_duplicate_captions)), batch_fields=("image", "tokens"),
      make_iterator=lambda: data_lib.train_iterator(config, cfg, seed=_seed(config, "clip"), tokenizer=tokenizer,
                                                    records=train_records()),
      frozen=None, evaluate=evaluate)


def build_diffusion(run: Run, carried: dict) -> Stage:
  config, d, mesh = run.config, run.config.diffusion, run.mesh
  dtype = jnp.dtype(config.dtype)
  configure = lambda module_config: _configure(run, module_config)
  if d.init_from:
    enc = diffusion_stage.encoders_from_directory(config, configure)
  else:
    enc = diffusion_stage.encoders_from_stages(config, carried[REGISTRY["autoencoder"].component],
                                               carried[REGISTRY["clip"].component], mesh, configure)
  replicated = parallel.replicated(mesh)
  enc.vae_params = jax.device_put(enc.vae_params, replicated)
  enc.text_params = jax.device_put(enc.text_params, replicated)

  vae = AutoencoderKL(enc.vae_config, dtype=dtype)
  text = TextEncoder(enc.text_config, dtype=dtype)
  latent_size = int(config.data.image_size) // enc.vae_config.downsample_factor
  unet_cfg = enc.unet_config or configure(diffusion_stage.unet_config(
      config, enc.vae_config.latent_channels, latent_size, enc.text_config.hidden_size))
  unet = unet_lib.UNet(unet_cfg, dtype=dtype)
  empty_tokens = enc.tokenizer([""])[0]  # [L]

  if d.cache:
    cache = diffusion_stage.build_cache(config, enc, mesh, os.path.join(run.workdir, "cache"))
    uncond = diffusion_stage.encode_text_states(enc.text_config, enc.text_params, enc.tokenizer,
                                                [""], mesh, int(d.encode_batch_size))[0]
    frozen = {"uncond_context": jnp.asarray(uncond)}
    fields = ("latent_mean", "latent_logvar", "context")
    make_iterator = lambda: data_lib.train_iterator(config, d, seed=_seed(config, "diffusion"), records=cache)
  else:
    frozen = {"vae": enc.vae_params, "text_encoder": enc.text_params}
    fields = ("image", "tokens")
    make_iterator = lambda: data_lib.train_iterator(config, d, seed=_seed(config, "diffusion"),
                                                    tokenizer=enc.tokenizer)
  frozen = jax.device_put(frozen, replicated)

  def init_fn(rng):
    c = unet_cfg
    return unet.init(rng, jnp.zeros((1, latent_size, latent_size, c.in_channels)), jnp.zeros((1,)),
                     jnp.zeros((1, enc.tokenizer.max_length, enc.text_config.hidden_size)))["params"]

  pipe = diffusion_stage.make_pipeline(enc, unet_cfg, None, dtype=dtype)
  pipe.params = jax.tree.map(np.asarray, data_lib.to_host({k: v for k, v in pipe.params.items() if v is not None}))
  captions = diffusion_stage.eval_captions(config, int(d.sample.eval_examples)) if d.sample.eval_examples else []
  score = config.data.name == "shapes"

  def sampling_params(state):
    weights = state.ema_params if state.ema_params is not None else state.params
    return jax.tree.map(np.asarray, data_lib.to_host(weights))

  def evaluate(state, step, final):
    if not captions or jax.process_count() > 1:  # the pipeline samples on one process
      return {}
    pipe.params = dict(pipe.params, unet=sampling_params(state))
    metrics, images = diffusion_stage.evaluate(pipe, captions, d, score=score)
    n = min(int(d.sample.grid_examples), len(images))
    path = run.writer.image("diffusion_samples", step, image_grid(images[:n]))
    if path:
      with open(path[:-4] + ".txt", "w") as f:
        f.write("\n".join(captions[:n]) + "\n")
    return metrics

  def export(state, step=None):
    pipe.params = dict(pipe.params, unet=sampling_params(state))
    export_lib.save_pipeline(pipe, os.path.join(run.workdir, "model"))

  return Stage(
      cfg=d, init_fn=init_fn, loss_fn=diffusion_stage.make_loss(unet, vae, text, enc.scheduler, d, empty_tokens),
      batch_fields=fields, make_iterator=make_iterator, frozen=frozen,
      initial_params=enc.unet_params, evaluate=evaluate,
      on_checkpoint=export if d.export_every_checkpoint else None, on_finish=export)


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One trainable stage."""
  build: Callable[[Run, dict], Stage]  # (run, carried items of the stages before) -> the stage
  component: str  # checkpoint item of its trained network, read by the stages after it


# The stages in their training order; config.stages names a subsequence of them.
REGISTRY: dict[str, StageSpec] = {
    "autoencoder": StageSpec(build_autoencoder, "vae"),
    "clip": StageSpec(build_clip, "clip"),
    "diffusion": StageSpec(build_diffusion, "unet"),
}
STAGES = tuple(REGISTRY)


def build(name: str, run: Run, carried: dict) -> Stage:
  """The `Stage` called `name`; `carried` holds the checkpoint items of the stages before it."""
  spec = REGISTRY[name]
  return dataclasses.replace(spec.build(run, carried), name=name, component=spec.component)
