"""Configuration checks that run before anything is compiled, each failure one clear sentence."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from diffusion_jax.diffusion.samplers import SAMPLERS
from diffusion_jax.diffusion.schedules import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS
from diffusion_jax.parallel import MESH_AXES
from diffusion_jax.xla_options import SCHEDULERS

DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("shapes", "image_folder")


class ConfigError(ValueError):
  """An invalid configuration value."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _same(a: Any, b: Any) -> bool:
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  return norm(a) == norm(b)


def module_config(cls: type, section: Any, where: str, derived: dict[str, tuple[Any, str]] | None = None,
                  **fixed: Any) -> Any:
  """`cls(**section)`, the module config a config section spells field by field.

  `derived` maps fields that follow from other stages to (value, what it is): a field left None takes
  the value, a field set to anything else is an error. `fixed` fills fields the section does not hold.
  """
  kwargs = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - set(fields))
  _require(not unknown, f"config.{where} has fields {unknown} that {cls.__name__} lacks")
  for name, value in kwargs.items():
    # A field that is "auto" in the config is a str to ml_collections, so a number given for it on the
    # command line arrives as text.
    if isinstance(value, str) and value.isdigit() and isinstance(fields[name].default, int):
      kwargs[name] = int(value)
  for name, (value, what) in (derived or {}).items():
    given = kwargs.get(name)
    _require(given is None or _same(given, value),
             f"config.{where}.{name} is {given!r} but {what} is {value!r}: leave it None, it is filled in")
    kwargs[name] = value
  kwargs.update(fixed)
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{where}: {e}") from e


def _positive(cfg: Any, prefix: str, *names: str) -> None:
  for name in names:
    value = cfg[name]
    _require(isinstance(value, (int, float)) and value > 0, f"config.{prefix}.{name} must be positive, got {value!r}")


def _check_training(cfg: Any, prefix: str) -> None:
  """The fields every stage shares: steps, batch, optimizer, intervals."""
  _positive(cfg, prefix, "steps", "batch_size", "learning_rate", "microbatches")
  _require(cfg.warmup_steps >= 0, f"config.{prefix}.warmup_steps must be >= 0, got {cfg.warmup_steps!r}")
  _require(0 <= cfg.end_lr_factor <= 1, f"config.{prefix}.end_lr_factor must be in [0, 1], got {cfg.end_lr_factor!r}")
  _require(cfg.weight_decay >= 0, f"config.{prefix}.weight_decay must be >= 0, got {cfg.weight_decay!r}")
  _require(0 <= cfg.b1 < 1 and 0 <= cfg.b2 < 1, f"config.{prefix}.b1 and b2 must be in [0, 1), got {cfg.b1}, {cfg.b2}")
  _require(cfg.batch_size % cfg.microbatches == 0,
           f"config.{prefix}.batch_size {cfg.batch_size} is not divisible by microbatches {cfg.microbatches}")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    _require(cfg[name] >= 0, f"config.{prefix}.{name} must be >= 0, got {cfg[name]!r}")
  _require(cfg.log_every > 0, f"config.{prefix}.log_every must be positive, got {cfg.log_every!r}")
  _require(cfg.xla_scheduler in SCHEDULERS, f"config.{prefix}.xla_scheduler must be one of "
           f"{sorted(SCHEDULERS)}, got {cfg.xla_scheduler!r}")
  if "ema_decay" in cfg:
    _require(0 <= cfg.ema_decay < 1, f"config.{prefix}.ema_decay must be in [0, 1), got {cfg.ema_decay!r}")


def check(config: Any) -> None:
  """Checks everything that does not depend on the devices; raises ConfigError."""
  from diffusion_jax.train.stages import STAGES  # pylint: disable=g-import-not-at-top  (it imports this module)
  stages = tuple(config.stages)
  _require(len(stages) > 0, "config.stages is empty: name at least one of " + ", ".join(STAGES))
  for name in stages:
    _require(name in STAGES, f"unknown stage {name!r} in config.stages; the stages are {', '.join(STAGES)}")
  _require(len(set(stages)) == len(stages), f"config.stages names a stage twice: {stages}")
  _require(config.dtype in DTYPES, f"config.dtype must be one of {DTYPES}, got {config.dtype!r}")
  _require(int(config.max_consecutive_nonfinite) >= 1,
           f"config.max_consecutive_nonfinite must be >= 1, got {config.max_consecutive_nonfinite!r}")
  _require(int(config.keep_checkpoints) >= 1, f"config.keep_checkpoints must be >= 1, got {config.keep_checkpoints!r}")
  for axis, size in config.mesh.items():
    _require(axis in MESH_AXES, f"unknown mesh axis {axis!r} in config.mesh; the axes are {MESH_AXES}")
    _require(isinstance(size, int) and (size > 0 or size == -1),
             f"config.mesh.{axis} must be a positive size or -1, got {size!r}")
  name = config.data.name
  _require(name in DATA_SOURCES or str(name).startswith("tfds:"),
           f"unknown data source {name!r}: use 'shapes', 'image_folder' or 'tfds:<name>'")
  _positive(config.data, "data", "image_size")

  for stage in stages:
    _check_training(config[stage], stage)
  if "autoencoder" in stages:
    m = config.autoencoder.model
    _require(config.data.image_size % 2 ** (len(m.block_out_channels) - 1) == 0,
             f"config.data.image_size {config.data.image_size} is not divisible by the autoencoder's downsampling "
             f"factor {2 ** (len(m.block_out_channels) - 1)}")
  if "clip" in stages:
    _require(config.clip.max_objects == 0 or name == "shapes",
             f"config.clip.max_objects selects `shapes` examples by their object count; set it to 0 for {name!r}")
    patch = config.clip.model.vision.patch_size
    _require(config.data.image_size % patch == 0,
             f"config.data.image_size {config.data.image_size} is not divisible by "
             f"config.clip.model.vision.patch_size {patch}")
  if "diffusion" in stages:
    _check_diffusion(config, stages)
  _check_models(config, stages)


def _check_models(config: Any, stages: tuple[str, ...]) -> None:
  """Builds the module configs that the config spells, so that a field they refuse fails here."""
  # pylint: disable=g-import-not-at-top  (these modules import this one)
  from diffusion_jax.train import autoencoder, clip, diffusion
  from_stages = "diffusion" in stages and not config.diffusion.init_from
  if "autoencoder" in stages or from_stages:
    vae = autoencoder.model_config(config)
  if "clip" in stages or from_stages:
    try:
      tokenizer = clip.make_tokenizer(config)
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.clip.tokenizer {config.clip.tokenizer!r}: {e}") from e
    text = clip.model_config(config, tokenizer).text
  if from_stages:
    latent_size = int(config.data.image_size) // vae.downsample_factor
    diffusion.unet_config(config, vae.latent_channels, latent_size, text.hidden_size)


def _check_diffusion(config: Any, stages: tuple[str, ...]) -> None:
  d = config.diffusion
  before = stages[:stages.index("diffusion")]
  if d.init_from:
    _require(os.path.isdir(os.path.join(d.init_from, "unet")),
             f"config.diffusion.init_from {d.init_from!r} is not a diffusers-format directory (no unet/)")
  else:
    _require("autoencoder" in before and "clip" in before,
             "the diffusion stage needs a VAE and a text encoder: run the autoencoder and clip stages before it, "
             "or set config.diffusion.init_from to a diffusers-format directory")
  _require(d.sample.sampler in SAMPLERS,
           f"unknown sampler {d.sample.sampler!r} in config.diffusion.sample.sampler; choose one of {', '.join(SAMPLERS)}")
  _positive(d.sample, "diffusion.sample", "steps")
  if d.prediction_type:
    _require(d.prediction_type in PREDICTION_TYPES,
             f"config.diffusion.prediction_type must be one of {PREDICTION_TYPES}, got {d.prediction_type!r}")
  _require(0 <= d.caption_dropout < 1, f"config.diffusion.caption_dropout must be in [0, 1), got {d.caption_dropout!r}")
  _require(d.min_snr_gamma >= 0, f"config.diffusion.min_snr_gamma must be >= 0 (0: off), got {d.min_snr_gamma!r}")
  s = d.scheduler
  _require(s.beta_schedule in BETA_SCHEDULES,
           f"config.diffusion.scheduler.beta_schedule must be one of {BETA_SCHEDULES}, got {s.beta_schedule!r}")
  _require(s.timestep_spacing in TIMESTEP_SPACINGS,
           f"config.diffusion.scheduler.timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {s.timestep_spacing!r}")
  _require(d.sample.steps <= s.num_train_timesteps,
           f"config.diffusion.sample.steps {d.sample.steps} exceeds num_train_timesteps {s.num_train_timesteps}")


def check_devices(config: Any, num_batch_shards: int, process_count: int) -> None:
  """Checks that every stage's batch splits evenly over processes, micro-batches and batch shards."""
  for stage in config.stages:
    cfg = config[stage]
    micro = cfg.batch_size // cfg.microbatches
    _require(cfg.batch_size % process_count == 0,
             f"config.{stage}.batch_size {cfg.batch_size} is not divisible by the {process_count} processes")
    _require(micro % num_batch_shards == 0,
             f"config.{stage}.batch_size {cfg.batch_size} (micro-batches of {micro}) is not divisible by the "
             f"{num_batch_shards} devices it is split over")
