"""Order of accuracy of the deterministic samplers on Gaussian data, whose probability-flow ODE is solved exactly.

Data: every latent element is independently x0 ~ N(mu, d**2). In variance-exploding coordinates
y = x_t / alpha_t, s = sigma_t / alpha_t, the exact denoiser is D(y, s) = mu + d**2 / (d**2 + s**2) (y - mu),
and the probability-flow ODE dy/ds = (y - D) / s = (y - mu) s / (d**2 + s**2) has the solution
(y - mu) / sqrt(d**2 + s**2) = const.

The order is measured on the interval t = 999 -> 199 of SD's schedule with "trailing" spacing and step
counts that divide 1000, so the grids are nested refinements of one another. Near t = 0 the grid uniform
in t has sigma ~ sqrt(t): the steps in log-sigma there shrink only like log N, and the final step to
sigma = 0 is the single evaluation x0 = D(x) in every sampler (diffusers' lower_order_final), so the last
steps would measure the grid rather than the solver. The complete solves are checked to converge too.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import losses, samplers, schedules
from diffusion_jax.diffusion.schedules import SchedulerConfig

SHAPE = (4, 4, 4, 4)  # [B, h, w, C]: 256 independent one-dimensional problems
RNG = np.random.RandomState(0)
MU = RNG.uniform(-0.5, 0.5, SHAPE).astype(np.float32)  # per-element data mean
DATA_STD = RNG.uniform(0.3, 1.2, SHAPE).astype(np.float32)  # per-element data std d
NOISE = RNG.randn(*SHAPE).astype(np.float32)
STEPS = (10, 20, 40, 100, 200)  # divisors of 1000: every grid contains t = 199
STOP_AT = 199
CONFIG = SchedulerConfig(timestep_spacing="trailing")  # SD's schedule; every run starts at t = 999
ALPHAS_CUMPROD = schedules.alphas_cumprod(CONFIG)


def exact_eps_model(x, t):
  """The exact eps-prediction of the Gaussian data at (variance-preserving) x_t."""
  alpha, sigma = losses.alpha_sigma(jnp.asarray(ALPHAS_CUMPROD), t.astype(jnp.int32))
  alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
  d2 = DATA_STD**2
  x0 = MU + alpha * d2 / (alpha**2 * d2 + sigma**2) * (x - alpha * MU)
  return (x - alpha * x0) / sigma


def truncated(plan, stop_at):
  """The plan's steps up to the one that lands on timestep `stop_at`."""
  last = int(np.nonzero(plan.timesteps_next == stop_at)[0][0])
  return plan.replace(**{f: getattr(plan, f)[:last + 1] for f in
                         ("timesteps", "alpha", "sigma", "alpha_next", "sigma_next", "timesteps_next")})


def error(name, num_steps, stop_at=None):
  """RMS distance between the sampler and the exact ODE solution at the level it stops at."""
  plan = samplers.make_plan(name, CONFIG, num_steps)
  if stop_at is not None:
    plan = truncated(plan, stop_at)
  x = np.asarray(jax.jit(lambda z: samplers.sample(name, exact_eps_model, z, plan))(NOISE), np.float64)
  alpha_0, alpha_end = np.float64(plan.alpha[0]), np.float64(plan.alpha_next[-1])
  s_start, s_end = plan.sigma[0] / alpha_0, plan.sigma_next[-1] / alpha_end
  # Loop state -> y = x / alpha: the VE samplers hold y already.
  y_start = NOISE * np.float64(plan.init_noise_sigma) / (1.0 if plan.ve_state else alpha_0)
  y = x if plan.ve_state else x / alpha_end
  d2 = np.float64(DATA_STD) ** 2
  y_exact = MU + (y_start - MU) * np.sqrt((d2 + s_end**2) / (d2 + s_start**2))
  return np.sqrt(np.mean((y - y_exact) ** 2))


@pytest.mark.parametrize("name,order", [("ddim", 1), ("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_error_falls_at_the_expected_order(name, order):
  errors = np.array([error(name, n, STOP_AT) for n in STEPS])
  slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
  assert np.all(np.diff(errors) < 0), errors
  if order == 1:
    assert 0.8 < slope < 1.3, (errors, slope)
  else:
    assert 1.6 < slope < 2.6, (errors, slope)
  assert errors[-1] < 0.01  # and the finest solve is accurate, not only converging


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras"])
def test_complete_solves_converge(name):
  """All steps, down to sigma = 0 (DDIM: to alphas_cumprod[0]): the error still falls with the step count."""
  errors = np.array([error(name, n) for n in (10, 40, 200)])
  assert np.all(np.diff(errors) < 0) and errors[-1] < 0.02, errors
