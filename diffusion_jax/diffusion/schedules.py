"""Noise schedules: betas, cumulative alphas, sigmas and the timesteps a sampler visits.

Conventions. The forward process is x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alphas_cumprod[t])
and sigma_t = sqrt(1 - alphas_cumprod[t]) ("variance preserving"). The "sigmas" of k-diffusion and of
diffusers' Euler/Heun/DPM-Solver schedulers are the variance-exploding noise levels
sigma_t / alpha_t = sqrt((1 - alphas_cumprod) / alphas_cumprod).

Everything here is NumPy and computed the way diffusers computes it (float32 betas, cumulative product
accumulated in float64 as torch does on the CPU, the same rounding of timesteps), so that a sampler sees
the same timesteps and noise levels as the matching diffusers scheduler.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers' sigma-based schedulers replace a zero terminal alphas_cumprod by this to keep sigma finite.
ZERO_SNR_ALPHAS_CUMPROD = 2.0**-24


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The noise schedule and its inference settings, field for field a diffusers `scheduler_config.json`.

  Defaults are Stable Diffusion 1.x's. Keys that a diffusers scheduler writes but no sampler here
  needs are ignored by `from_dict`.
  """
  num_train_timesteps: int = 1000  # T: the number of discrete training timesteps
  beta_start: float = 0.00085  # beta of timestep 0
  beta_end: float = 0.012  # beta of timestep T - 1
  beta_schedule: str = "scaled_linear"  # "linear", "scaled_linear" or "squaredcos_cap_v2"
  trained_betas: tuple[float, ...] | None = None  # explicit betas; overrides the three fields above
  prediction_type: str = "epsilon"  # what the network predicts: "epsilon", "v_prediction" or "sample"
  timestep_spacing: str = "leading"  # how inference timesteps are spread: "leading", "trailing", "linspace"
  steps_offset: int = 1  # added to "leading" timesteps (SD uses 1)
  rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al. 2023)
  clip_sample: bool = False  # clip predicted x0 to [-clip_sample_range, clip_sample_range] (DDPM/DDIM/Heun)
  clip_sample_range: float = 1.0  # the clipping bound used when clip_sample is set
  set_alpha_to_one: bool = False  # DDIM: the level after the last step is alphas_cumprod = 1 (else alphas_cumprod[0])
  variance_type: str = "fixed_small"  # DDPM's reverse variance: "fixed_small" or "fixed_large"
  thresholding: bool = False  # dynamic thresholding (Imagen); not supported, kept for round trips
  skip_prk_steps: bool = True  # PNDM only: SD's json sets it; kept so that an exported config loads the same
  class_name: str = "PNDMScheduler"  # `_class_name` written by to_dict

  def __post_init__(self):
    if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
    if self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
    if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
    """From a diffusers scheduler config dict; unknown keys (and `_diffusers_version`) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    if "_class_name" in d:
      kwargs["class_name"] = d["_class_name"]
    return cls(**kwargs)

  def to_dict(self, class_name: str | None = None) -> dict[str, Any]:
    """A diffusers-compatible dict (json-serialisable), `_class_name` first."""
    d = {"_class_name": class_name or self.class_name, "_diffusers_version": "0.30.0"}
    for f in dataclasses.fields(self):
      if f.name == "class_name":
        continue
      value = getattr(self, f.name)
      d[f.name] = list(value) if isinstance(value, tuple) else value
    return d

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "SchedulerConfig":
    with open(path) as f:
      return cls.from_dict(json.load(f))


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
  return np.linspace(start, stop, num, dtype=np.float64).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
  """float32 cumulative product accumulated in float64, as torch.cumprod does on the CPU."""
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the cosine schedule (Nichol & Dhariwal 2021), "squaredcos_cap_v2"."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
           for i in range(num_train_timesteps)]
  return np.asarray(betas, np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
  betas = np.asarray(betas, np.float32)
  alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
  first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
  # Shift so the last value is 0, then scale so the first value is unchanged.
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


def betas(config: SchedulerConfig) -> np.ndarray:
  """float32 [T] betas of the training noise schedule (zero-terminal-SNR rescaled if configured)."""
  T = config.num_train_timesteps
  if config.trained_betas is not None:
    b = np.asarray(config.trained_betas, np.float32)
  elif config.beta_schedule == "linear":
    b = _linspace_f32(config.beta_start, config.beta_end, T)
  elif config.beta_schedule == "scaled_linear":
    b = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, T) ** 2  # linear in sqrt(beta)
  elif config.beta_schedule == "squaredcos_cap_v2":
    b = betas_for_alpha_bar(T)
  else:
    raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}")
  if config.rescale_betas_zero_snr:
    b = rescale_zero_terminal_snr(b)
  return b


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """float32 [T] alphas_cumprod[t] = prod_{s <= t} (1 - beta_s): the signal variance of x_t."""
  return _cumprod_f32(np.float32(1.0) - betas(config))


def train_sigmas(config: SchedulerConfig) -> np.ndarray:
  """float32 [T] variance-exploding sigmas sqrt((1 - a) / a) of the training timesteps.

  With zero terminal SNR the last alphas_cumprod is replaced by 2**-24, as diffusers' sigma-based
  schedulers do, so that sigma stays finite.
  """
  a = alphas_cumprod(config)
  if config.rescale_betas_zero_snr:
    a = a.copy()
    a[-1] = ZERO_SNR_ALPHAS_CUMPROD
  return np.sqrt((np.float32(1.0) - a) / a)


def spaced_timesteps(config: SchedulerConfig, num_steps: int, *, round_linspace: bool = True) -> np.ndarray:
  """The `num_steps` inference timesteps, descending, as diffusers' DDPM/DDIM/Euler `set_timesteps`.

  "leading": multiples of T // num_steps plus steps_offset; "trailing": T - 1 down in steps of
  T / num_steps; "linspace": num_steps points evenly spread over [0, T - 1], rounded to integers when
  `round_linspace` (DDPM, DDIM) or kept fractional in float32 (Euler, Euler ancestral, Heun).
  """
  T = config.num_train_timesteps
  _check_steps(num_steps, T)
  if config.timestep_spacing == "linspace":
    if not round_linspace:
      return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
  if config.timestep_spacing == "leading":
    step_ratio = T // num_steps
    return (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.int64) + config.steps_offset
  if config.timestep_spacing == "trailing":
    return np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
  raise ValueError(f"unknown timestep_spacing {config.timestep_spacing!r}")


def dpm_solver_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """Timesteps of diffusers' DPMSolverMultistepScheduler, whose "linspace" and "leading" spacings
  divide [0, T) into num_steps + 1 points and drop the last one."""
  T = config.num_train_timesteps
  _check_steps(num_steps, T)
  if config.timestep_spacing == "linspace":
    return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  if config.timestep_spacing == "leading":
    step_ratio = T // (num_steps + 1)
    timesteps = (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1].astype(np.int64)
    return timesteps + config.steps_offset
  return spaced_timesteps(config, num_steps)  # "trailing" is the same for every scheduler


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
  """Sigma at (possibly fractional) timesteps, linearly interpolated in t (float64)."""
  return np.interp(np.asarray(timesteps, np.float64), np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
  """The noise levels of Karras et al. 2022 (eq. 5), descending from sigma_max to sigma_min."""
  ramp = np.linspace(0, 1, num_steps)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional timestep of each sigma: linear interpolation of log-sigma between training timesteps."""
  sigma = np.asarray(sigma)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]  # [T, n]
  low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)
