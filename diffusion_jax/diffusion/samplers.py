"""Samplers: ddpm, ddim, euler, euler_a, heun, dpmpp_2m and dpmpp_2m_karras.

`make_plan` (NumPy, once per configuration) lists, for each step, the time the model is called at and
the noise level the step starts from and lands on; `sample` runs the whole loop under `jax.lax.scan`.
Each sampler is one small step function `step(denoise, x, memory, s, key, plan) -> (x, memory)` where
`denoise` turns the raw model output into (x0, eps) through `losses`, so every parametrisation works
with every sampler.

Noise levels are stored variance-preserving: x_t = alpha * x0 + sigma * eps, alpha**2 + sigma**2 = 1.
As in diffusers, ddpm, ddim and the DPM-Solver keep x_t as the loop state, while euler, euler_a and
heun keep x_t / alpha (k-diffusion's variance-exploding x0 + sigma_ve * eps, sigma_ve = sigma / alpha)
and feed the model x_t (diffusers' `scale_model_input`). With the same initial `noise` (diffusers'
`latents` before `init_noise_sigma`) each sampler reproduces the matching diffusers scheduler:
DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler and DPMSolverMultistepScheduler (use_karras_sigmas for dpmpp_2m_karras).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.schedules import SchedulerConfig

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras")
# Samplers whose loop state is x_t / alpha_t (diffusers' sigma-based Euler/Heun schedulers).
VE_STATE_SAMPLERS = ("euler", "euler_a", "heun")
# diffusers' scheduler class for each sampler (dpmpp_2m_karras adds use_karras_sigmas=True).
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, h, w, C], t [B] float32) -> raw output


@struct.dataclass
class SamplerPlan:
  """Everything a sampler needs, per step: a pytree of NumPy arrays plus static metadata.

  Plans of the same sampler, prediction type and step count share one tree structure, so a jitted
  function that takes the plan as an argument compiles once for all schedules and spacings.
  """
  name: str = struct.field(pytree_node=False)  # one of SAMPLERS
  prediction_type: str = struct.field(pytree_node=False)  # what model_fn returns
  init_noise_sigma: np.ndarray  # [] float32: the initial state is noise * init_noise_sigma
  timesteps: np.ndarray  # [N] float32 time the model is called at in each step
  alpha: np.ndarray  # [N] float32 the level each step starts from: x_t = alpha * x0 + sigma * eps
  sigma: np.ndarray  # [N] float32
  alpha_next: np.ndarray  # [N] float32 the level each step lands on (last: alpha=1, sigma=0, except DDIM)
  sigma_next: np.ndarray  # [N] float32
  timesteps_next: np.ndarray  # [N] float32 model time at the level landed on (Heun's second call); -1: none
  eta: float = struct.field(pytree_node=False, default=0.0)  # DDIM's stochasticity
  clip_sample_range: float | None = struct.field(pytree_node=False, default=None)  # clip x0 (DDPM/DDIM/Heun)
  variance_type: str = struct.field(pytree_node=False, default="fixed_small")  # DDPM's reverse variance

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]

  @property
  def ve_state(self) -> bool:
    """Whether the loop state is x_t / alpha_t rather than x_t."""
    return self.name in VE_STATE_SAMPLERS

  def ve_sigmas(self) -> np.ndarray:
    """[N + 1] variance-exploding sigmas sigma / alpha of the visited levels (diffusers' `scheduler.sigmas`)."""
    return np.append(np.asarray(self.sigma) / np.asarray(self.alpha),
                     np.asarray(self.sigma_next[-1]) / np.asarray(self.alpha_next[-1])).astype(np.float32)


class Step(NamedTuple):
  """One step's slice of the plan, as the scan body sees it (all scalars)."""
  index: jax.Array  # int32 absolute step number (keys the step's noise)
  t: jax.Array
  alpha: jax.Array
  sigma: jax.Array
  alpha_next: jax.Array
  sigma_next: jax.Array
  timesteps_next: jax.Array


# ----------------------------------------------------------------------------------------------------
# Plans (NumPy)


def _levels_from_alphas_cumprod(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(a, np.float64)
  return np.sqrt(a).astype(np.float32), np.sqrt(1.0 - a).astype(np.float32)


def _levels_from_ve_sigmas(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  s = np.asarray(s, np.float64)
  alpha = 1.0 / np.sqrt(1.0 + s**2)
  return alpha.astype(np.float32), (s * alpha).astype(np.float32)


def _plan_from_alphas_cumprod(name, config, timesteps, a_from, a_to, timesteps_next, **kw) -> SamplerPlan:
  alpha, sigma = _levels_from_alphas_cumprod(a_from)
  alpha_next, sigma_next = _levels_from_alphas_cumprod(a_to)
  return SamplerPlan(name=name, prediction_type=config.prediction_type, init_noise_sigma=np.float32(1.0),
                     timesteps=np.asarray(timesteps, np.float32), alpha=alpha, sigma=sigma,
                     alpha_next=alpha_next, sigma_next=sigma_next,
                     timesteps_next=np.asarray(timesteps_next, np.float32), **kw)


def _plan_from_ve_sigmas(name, config, timesteps, sigmas, init_noise_sigma, **kw) -> SamplerPlan:
  """sigmas: [N + 1] float32 variance-exploding levels, the last one 0."""
  alpha, sigma = _levels_from_ve_sigmas(sigmas)
  timesteps = np.asarray(timesteps, np.float32)
  return SamplerPlan(name=name, prediction_type=config.prediction_type, init_noise_sigma=np.float32(init_noise_sigma),
                     timesteps=timesteps, alpha=alpha[:-1], sigma=sigma[:-1], alpha_next=alpha[1:],
                     sigma_next=sigma[1:], timesteps_next=np.append(timesteps[1:], -1.0).astype(np.float32), **kw)


def _k_diffusion_init_noise_sigma(config: SchedulerConfig, sigmas: np.ndarray) -> np.float32:
  """diffusers' Euler/Heun `init_noise_sigma`: sigma_max, or sqrt(sigma_max**2 + 1) for "leading"."""
  sigma_max = np.float32(sigmas.max())
  if config.timestep_spacing in ("linspace", "trailing"):
    return sigma_max
  return np.sqrt(sigma_max**2 + np.float32(1.0))


def make_plan(name: str, config: SchedulerConfig, num_steps: int, *, eta: float = 0.0) -> SamplerPlan:
  """The static description of `num_steps` steps of sampler `name` under `config` (see SamplerPlan)."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
  if config.thresholding:
    raise NotImplementedError("dynamic thresholding is not supported (it does not suit latent diffusion)")
  if eta and name != "ddim":
    raise ValueError(f"eta applies to ddim only, not {name!r}")
  clip = config.clip_sample_range if config.clip_sample and name in ("ddpm", "ddim", "heun") else None
  T = config.num_train_timesteps

  if name in ("ddpm", "ddim"):
    a = schedules.alphas_cumprod(config)
    t = schedules.spaced_timesteps(config, num_steps)
    if name == "ddpm":
      if config.variance_type not in ("fixed_small", "fixed_large"):
        raise NotImplementedError(f"variance_type {config.variance_type!r} is not supported")
      # Each step lands on the next timestep of the list; the last on the clean sample.
      a_to = np.append(a[t[1:]], np.float32(1.0))
      return _plan_from_alphas_cumprod(name, config, t, a[t], a_to, np.append(t[1:], -1), clip_sample_range=clip,
                                       variance_type=config.variance_type)
    # DDIM lands T // N timesteps lower (as diffusers, whatever the spacing); below 0 on the final level.
    prev = t - T // num_steps
    final = np.float32(1.0) if config.set_alpha_to_one else a[0]
    a_to = np.where(prev >= 0, a[np.maximum(prev, 0)], final)
    return _plan_from_alphas_cumprod(name, config, t, a[t], a_to, prev, clip_sample_range=clip, eta=float(eta))

  train = schedules.train_sigmas(config)
  if name in VE_STATE_SAMPLERS:
    t = schedules.spaced_timesteps(config, num_steps, round_linspace=False).astype(np.float32)
    sigmas = np.append(schedules.interp_sigmas(t, train), 0.0).astype(np.float32)
    return _plan_from_ve_sigmas(name, config, t, sigmas, _k_diffusion_init_noise_sigma(config, sigmas),
                                clip_sample_range=clip)

  # DPM-Solver++(2M).
  if name == "dpmpp_2m_karras":
    sigmas = schedules.karras_sigmas(float(train[0]), float(train[-1]), num_steps)
    t = schedules.sigma_to_t(sigmas, np.log(train))
    if config.beta_schedule != "squaredcos_cap_v2":
      t = t.round()
  else:
    t = schedules.dpm_solver_timesteps(config, num_steps)
    sigmas = schedules.interp_sigmas(t, train)
  t = t.astype(np.int64)  # the model sees integer timesteps (truncated, as diffusers)
  sigmas = np.append(sigmas, 0.0).astype(np.float32)
  return _plan_from_ve_sigmas(name, config, t, sigmas, 1.0)


def img2img_start_step(num_steps: int, strength: float) -> int:
  """The first step img2img runs: diffusers' `get_timesteps(num_steps, strength)` skips this many."""
  init_timestep = min(int(num_steps * strength), num_steps)
  return max(num_steps - init_timestep, 0)


def noise_to_step(x0, noise, plan: SamplerPlan, step_index):
  """Clean latents x0 noised to the level step `step_index` starts from, as the loop state holds it.

  Matches diffusers' `scheduler.add_noise` at that step; `step_index == num_steps` gives x0 itself.
  `step_index` may be traced (e.g. inside `post_step`).
  """
  alpha = jnp.append(jnp.asarray(plan.alpha), 1.0)[step_index]
  sigma = jnp.append(jnp.asarray(plan.sigma), 0.0)[step_index]
  if plan.ve_state:
    return x0 + (sigma / alpha) * noise
  return alpha * x0 + sigma * noise


def inpaint_post_step(plan: SamplerPlan, init_latents, noise, mask):
  """A `post_step` that keeps the unmasked latents (mask 0) on the init latents' noising trajectory.

  diffusers' inpainting with a plain 4-channel UNet: after step i the known region is replaced by the
  init latents noised to the level of step i + 1 (clean after the last step). mask: [B, h, w, 1], 1 = repaint.
  """
  def post_step(x, step_index):
    known = noise_to_step(init_latents, noise, plan, step_index + 1)
    return mask * x + (1.0 - mask) * known

  return post_step


# ----------------------------------------------------------------------------------------------------
# Step functions. x is the loop state; `memory` is what a multistep method carries between steps.


def _denoise(model_fn: ModelFn, plan: SamplerPlan, x_t, t, alpha, sigma):
  """(x0, eps) predicted by the model at x_t = alpha * x0 + sigma * eps (x0 clipped if configured)."""
  out = model_fn(x_t, jnp.full((x_t.shape[0],), t, jnp.float32)).astype(jnp.float32)
  x0 = losses.to_x0(out, x_t, alpha, sigma, plan.prediction_type)
  eps = losses.to_eps(out, x_t, alpha, sigma, plan.prediction_type)
  if plan.clip_sample_range is not None:
    x0 = jnp.clip(x0, -plan.clip_sample_range, plan.clip_sample_range)
  return x0, eps


def ddpm_step(denoise, x, memory, s: Step, key, plan: SamplerPlan):
  """Ancestral step from the posterior q(x_next | x_t, x0) (Ho et al. 2020, eqs. 6-7)."""
  x0, _ = denoise(x, s.t, s.alpha, s.sigma)
  step_alpha = s.alpha**2 / s.alpha_next**2  # 1 - beta of this (multi-timestep) step
  step_beta = 1.0 - step_alpha
  var_ratio = s.sigma_next**2 / s.sigma**2
  mean = (s.alpha_next * step_beta / s.sigma**2) * x0 + (jnp.sqrt(step_alpha) * var_ratio) * x
  if plan.variance_type == "fixed_large":
    variance = step_beta
  else:
    variance = jnp.maximum(var_ratio * step_beta, 1e-20)
  std = jnp.where(s.t > 0, jnp.sqrt(variance), 0.0)  # no noise after timestep 0
  return mean + std * jax.random.normal(key, x.shape, x.dtype), memory


def ddim_step(denoise, x, memory, s: Step, key, plan: SamplerPlan):
  """DDIM (Song et al. 2021, eq. 12): deterministic for eta = 0, adds fresh noise for eta > 0."""
  x0, eps = denoise(x, s.t, s.alpha, s.sigma)
  if plan.eta == 0:
    return s.alpha_next * x0 + s.sigma_next * eps, memory
  variance = (s.sigma_next**2 / s.sigma**2) * (1.0 - s.alpha**2 / s.alpha_next**2)
  std = plan.eta * jnp.sqrt(variance)
  x_next = s.alpha_next * x0 + jnp.sqrt(s.sigma_next**2 - std**2) * eps
  return x_next + std * jax.random.normal(key, x.shape, x.dtype), memory


def _ve(alpha, sigma):
  return sigma / alpha


def euler_step(denoise, x, memory, s: Step, key, plan: SamplerPlan):
  """Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, alg. 1)."""
  sig, sig_next = _ve(s.alpha, s.sigma), _ve(s.alpha_next, s.sigma_next)
  x0, _ = denoise(x * s.alpha, s.t, s.alpha, s.sigma)  # x * alpha = x / sqrt(sig**2 + 1)
  d = (x - x0) / sig
  return x + d * (sig_next - sig), memory


def euler_ancestral_step(denoise, x, memory, s: Step, key, plan: SamplerPlan):
  """Euler down to sigma_down, then fresh noise up to sigma_next (k-diffusion's sample_euler_ancestral)."""
  sig, sig_next = _ve(s.alpha, s.sigma), _ve(s.alpha_next, s.sigma_next)
  x0, _ = denoise(x * s.alpha, s.t, s.alpha, s.sigma)
  sig_up = jnp.sqrt(sig_next**2 * (sig**2 - sig_next**2) / sig**2)
  sig_down = jnp.sqrt(jnp.maximum(sig_next**2 - sig_up**2, 0.0))
  d = (x - x0) / sig
  return x + d * (sig_down - sig) + jax.random.normal(key, x.shape, x.dtype) * sig_up, memory


def heun_step(denoise, x, memory, s: Step, key, plan: SamplerPlan):
  """Heun's second-order step (Karras et al. 2022, alg. 1); the final step to sigma = 0 stays Euler."""
  sig, sig_next = _ve(s.alpha, s.sigma), _ve(s.alpha_next, s.sigma_next)
  x0, _ = denoise(x * s.alpha, s.t, s.alpha, s.sigma)
  d = (x - x0) / sig
  dt = sig_next - sig
  x_euler = x + d * dt

  def corrected():  # average the slopes at both ends
    x0_next, _ = denoise(x_euler * s.alpha_next, s.timesteps_next, s.alpha_next, s.sigma_next)
    d_next = (x_euler - x0_next) / sig_next
    return x + (d + d_next) / 2 * dt

  return jax.lax.cond(s.sigma_next > 0, corrected, lambda: x_euler), memory


def dpmpp_2m_step(denoise, x, memory, s: Step, key, plan: SamplerPlan):
  """DPM-Solver++(2M) (Lu et al. 2022, alg. 2; diffusers' midpoint form).

  Exponential integrator in lambda = log(alpha / sigma) that extrapolates x0 linearly from the
  previous step's prediction. First order on the first step and on the final step to sigma = 0
  (diffusers' lower_order_final), where it returns the prediction x0.
  """
  x0_prev, lam_prev, has_prev = memory
  x0, _ = denoise(x, s.t, s.alpha, s.sigma)
  lam = jnp.log(s.alpha) - jnp.log(s.sigma)
  lam_next = jnp.log(s.alpha_next) - jnp.log(s.sigma_next)  # +inf at sigma_next = 0
  h = lam_next - lam
  first_order = jnp.logical_or(jnp.logical_not(has_prev), s.sigma_next == 0)
  r = jnp.where(first_order, 1.0, (lam - lam_prev) / h)  # previous step size / this one
  d = jnp.where(first_order, x0, x0 + 0.5 * (x0 - x0_prev) / r)
  x_next = (s.sigma_next / s.sigma) * x - s.alpha_next * jnp.expm1(-h) * d
  return x_next, (x0, lam, jnp.asarray(True))


STEP_FNS = {
    "ddpm": ddpm_step, "ddim": ddim_step, "euler": euler_step, "euler_a": euler_ancestral_step,
    "heun": heun_step, "dpmpp_2m": dpmpp_2m_step, "dpmpp_2m_karras": dpmpp_2m_step,
}


def _initial_memory(name: str, x):
  if name.startswith("dpmpp_2m"):
    return jnp.zeros_like(x), jnp.float32(0.0), jnp.asarray(False)
  return ()


def is_stochastic(plan: SamplerPlan) -> bool:
  """Whether the sampler draws noise at each step (and so needs a key)."""
  return plan.name in ("ddpm", "euler_a") or (plan.name == "ddim" and plan.eta > 0)


# ----------------------------------------------------------------------------------------------------
# The loop.


def initial_state(name: str, noise, plan: SamplerPlan, *, start_step: int = 0, init_latents=None):
  """The loop state `(x, memory)` before step `start_step` (see `sample` for the arguments)."""
  if name != plan.name:
    raise ValueError(f"sampler {name!r} does not match the plan's {plan.name!r}")
  if not 0 <= start_step <= plan.num_steps:
    raise ValueError(f"start_step must be in [0, {plan.num_steps}], got {start_step}")
  noise = jnp.asarray(noise, jnp.float32)
  if init_latents is None:
    x = noise * plan.init_noise_sigma
  else:
    x = noise_to_step(jnp.asarray(init_latents, jnp.float32), noise, plan, start_step)
  return x, _initial_memory(name, x)


def run_steps(name: str, model_fn: ModelFn, state, plan: SamplerPlan, key=None, *, first=0,
              count: int | None = None, post_step: Callable | None = None):
  """Runs steps `first` .. `first + count - 1` on the loop state from `initial_state`; returns the new state.

  `first` may be traced (an int32 scalar: one compiled program then serves every step); `count` is
  static, by default every step from `first` on. The final latents are `state[0]` after the last step.
  """
  if name != plan.name:
    raise ValueError(f"sampler {name!r} does not match the plan's {plan.name!r}")
  n = plan.num_steps
  static_first = isinstance(first, (int, np.integer))
  if count is None:
    if not static_first:
      raise ValueError("count is needed when first is traced")
    count = n - int(first)
  if count < 0 or count > n or (static_first and not 0 <= first <= n - count):
    where = f"{count} steps from step {first}" if static_first else f"{count} steps"
    raise ValueError(f"{where} do not fit the plan's {n} steps")
  if key is None:
    if is_stochastic(plan):
      raise ValueError(f"sampler {name!r} draws noise: pass a PRNG key")
    key = jax.random.key(0)

  steps = Step(np.arange(n, dtype=np.int32), plan.timesteps, plan.alpha, plan.sigma, plan.alpha_next,
               plan.sigma_next, plan.timesteps_next)
  if static_first:
    steps = jax.tree.map(lambda a: jnp.asarray(a)[first:first + count], steps)
  else:  # [count] slices at a traced offset
    steps = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(jnp.asarray(a), first, count), steps)
  step_fn = STEP_FNS[name]

  def denoise(x_t, t, alpha, sigma):
    return _denoise(model_fn, plan, x_t, t, alpha, sigma)

  def body(carry, s):
    x, memory = carry
    x, memory = step_fn(denoise, x, memory, s, jax.random.fold_in(key, s.index), plan)
    if post_step is not None:
      x = post_step(x, s.index)
    return (x, memory), None

  state, _ = jax.lax.scan(body, state, steps)
  return state


def sample(name: str, model_fn: ModelFn, noise, plan: SamplerPlan, key=None, *, start_step: int = 0,
           init_latents=None, post_step: Callable | None = None):
  """Runs the sampler and returns the final latents (x0) [B, h, w, C] float32; jit-able.

  Args:
    name: the sampler; must be the plan's.
    model_fn: (x_t [B, h, w, C], t [B] float32) -> raw model output in `plan.prediction_type`
      (the network, wrapped with guidance by the caller). It receives the variance-preserving x_t,
      i.e. after diffusers' `scale_model_input`.
    noise: standard normal [B, h, w, C] (diffusers' `latents` before `init_noise_sigma`).
    plan: from `make_plan`.
    key: PRNG key; step i draws `jax.random.normal(jax.random.fold_in(key, i), x.shape)`. Needed by
      ddpm, euler_a and ddim with eta > 0 only.
    start_step: static number of leading steps to skip (img2img: `img2img_start_step`).
    init_latents: clean latents x0; if given, the loop starts from them noised with `noise` to the level
      of `start_step` (diffusers' img2img `add_noise`), else from `noise * plan.init_noise_sigma`.
    post_step: optional `(x, step_index) -> x` applied after every step to the loop state (see
      `inpaint_post_step` and `noise_to_step`).

  The same loop in pieces: `initial_state`, then `run_steps` (all at once or a few steps at a time).
  """
  state = initial_state(name, noise, plan, start_step=start_step, init_latents=init_latents)
  return run_steps(name, model_fn, state, plan, key, first=start_step, post_step=post_step)[0]
