"""Parametrisations, training targets, min-SNR weights and guidance against diffusers and the papers' formulas."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.training_utils import compute_snr

from diffusion_jax.diffusion import guidance, losses, schedules
from diffusion_jax.diffusion.schedules import SchedulerConfig

SHAPE = (5, 4, 4, 3)
RNG = np.random.RandomState(0)
X0 = RNG.randn(*SHAPE).astype(np.float32)
EPS = RNG.randn(*SHAPE).astype(np.float32)
TIMESTEPS = np.array([0, 10, 250, 700, 999])
CONFIG = SchedulerConfig()
ALPHAS_CUMPROD = schedules.alphas_cumprod(CONFIG)


def levels():
  alpha, sigma = losses.alpha_sigma(ALPHAS_CUMPROD, TIMESTEPS)
  x_t = losses.add_noise(X0, EPS, ALPHAS_CUMPROD, TIMESTEPS)
  return alpha, sigma, x_t


def test_add_noise_and_velocity_match_diffusers():
  sched = diffusers.DDPMScheduler.from_config(CONFIG.to_dict())
  t = torch.from_numpy(TIMESTEPS)
  alpha, sigma, x_t = levels()
  ref = sched.add_noise(torch.from_numpy(X0), torch.from_numpy(EPS), t).numpy()
  np.testing.assert_allclose(x_t, ref, rtol=1e-6, atol=1e-6)
  v = losses.get_velocity(X0, EPS, alpha, sigma)
  ref_v = sched.get_velocity(torch.from_numpy(X0), torch.from_numpy(EPS), t).numpy()
  np.testing.assert_allclose(v, ref_v, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(losses.training_target(X0, EPS, alpha, sigma, "v_prediction"), ref_v, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(losses.training_target(X0, EPS, alpha, sigma, "epsilon"), EPS)
  np.testing.assert_array_equal(losses.training_target(X0, EPS, alpha, sigma, "sample"), X0)


@pytest.mark.parametrize("prediction_type", losses.PREDICTION_TYPES)
def test_conversions_recover_x0_eps_and_v(prediction_type):
  alpha, sigma, x_t = levels()
  v = losses.get_velocity(X0, EPS, alpha, sigma)
  out = losses.training_target(X0, EPS, alpha, sigma, prediction_type)
  # t = 0 has sigma = 0.029: recovering eps from x0 divides by it, so allow its amplification.
  np.testing.assert_allclose(losses.to_x0(out, x_t, alpha, sigma, prediction_type), X0, atol=2e-5)
  np.testing.assert_allclose(losses.to_eps(out, x_t, alpha, sigma, prediction_type), EPS, atol=2e-4)
  np.testing.assert_allclose(losses.to_v(out, x_t, alpha, sigma, prediction_type), v, atol=2e-4)


@pytest.mark.parametrize("a,b", [("epsilon", "v_prediction"), ("v_prediction", "sample"), ("sample", "epsilon")])
def test_conversions_round_trip(a, b):
  alpha, sigma, x_t = levels()
  out = jnp.asarray(RNG.randn(*SHAPE).astype(np.float32))  # any model output, not only the exact one
  there = losses.convert(out, x_t, alpha, sigma, a, b)
  back = losses.convert(there, x_t, alpha, sigma, b, a)
  np.testing.assert_allclose(back, out, rtol=1e-4, atol=1e-4)


def test_v_relates_x0_and_eps_as_a_rotation():
  """(x_t, v) = (alpha x0 + sigma eps, alpha eps - sigma x0) rotates (x0, eps): the squared norms add up alike."""
  alpha, sigma, x_t = levels()
  v = losses.get_velocity(X0, EPS, alpha, sigma)
  np.testing.assert_allclose(v**2 + x_t**2, X0**2 + EPS**2, rtol=1e-4, atol=1e-5)


def test_snr_matches_diffusers():
  sched = diffusers.DDPMScheduler.from_config(CONFIG.to_dict())
  ref = compute_snr(sched, torch.from_numpy(TIMESTEPS)).numpy()
  np.testing.assert_allclose(losses.snr(ALPHAS_CUMPROD, TIMESTEPS), ref, rtol=1e-5)


def test_min_snr_weights_follow_the_paper():
  """Hang et al. 2023: the x0 loss is weighted by min(SNR, gamma); the eps and v MSEs get the weights that
  make them equal to that weighted x0 loss, for any model output."""
  gamma = 5.0
  alpha, sigma, x_t = levels()
  snr = np.asarray(losses.snr(ALPHAS_CUMPROD, TIMESTEPS))
  np.testing.assert_allclose(losses.min_snr_weights(snr, gamma, "sample"), np.minimum(snr, gamma), rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weights(snr, gamma, "epsilon"), np.minimum(snr, gamma) / snr, rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weights(snr, gamma, "v_prediction"), np.minimum(snr, gamma) / (snr + 1),
                             rtol=1e-6)
  x0_hat = X0 + 0.1 * RNG.randn(*SHAPE).astype(np.float32)
  x0_loss = np.minimum(snr, gamma) * np.mean((x0_hat - X0) ** 2, axis=(1, 2, 3))
  for prediction_type in ("epsilon", "v_prediction"):
    out = losses.convert(x0_hat, x_t, alpha, sigma, "sample", prediction_type)
    w = losses.min_snr_weights(snr, gamma, prediction_type)
    loss = losses.diffusion_loss(out, X0, EPS, alpha, sigma, prediction_type, weights=w)
    np.testing.assert_allclose(loss, x0_loss, rtol=2e-3)
  # Zero terminal SNR: the eps weight tends to 1 (not 0 / 0).
  assert float(losses.min_snr_weights(np.float32([0.0]), gamma, "epsilon")[0]) == 1.0


def test_diffusion_loss_is_the_per_example_mse_and_differentiable():
  alpha, sigma, x_t = levels()
  out = jnp.asarray(RNG.randn(*SHAPE).astype(np.float32))
  loss = losses.diffusion_loss(out, X0, EPS, alpha, sigma, "epsilon")
  np.testing.assert_allclose(loss, np.mean((np.asarray(out) - EPS) ** 2, axis=(1, 2, 3)), rtol=1e-6)
  grad = jax.grad(lambda o: losses.diffusion_loss(o, X0, EPS, alpha, sigma, "epsilon").sum())(out)
  np.testing.assert_allclose(grad, 2 * (np.asarray(out) - EPS) / np.prod(SHAPE[1:]), rtol=1e-5, atol=1e-8)


def test_unknown_prediction_type_is_rejected():
  with pytest.raises(ValueError, match="prediction_type"):
    losses.to_x0(X0, X0, 1.0, 0.0, "score")


# Guidance.


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(guidance_rescale):
  uncond, cond = RNG.randn(2, *SHAPE).astype(np.float32)
  guided = guidance.cfg(uncond, cond, 7.5)
  np.testing.assert_allclose(guided, uncond + 7.5 * (cond - uncond), rtol=1e-6)
  ours = guidance.rescale(guided, cond, guidance_rescale)
  ref = rescale_noise_cfg(torch.from_numpy(np.asarray(guided)), torch.from_numpy(cond), guidance_rescale).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  if guidance_rescale == 1.0:  # fully rescaled: each example has the conditional output's std
    np.testing.assert_allclose(np.std(ours, axis=(1, 2, 3)), np.std(cond, axis=(1, 2, 3)), rtol=1e-5)


def test_guided_model_fn_batches_uncond_first():
  calls = []

  def net(x, t, context):  # [2B, ...]: a network whose output depends on the context
    calls.append(x.shape[0])
    return x * context[:, :1, None, None] + t[:, None, None, None]

  x = jnp.asarray(X0)
  t = jnp.full((SHAPE[0],), 3.0)
  cond_ctx, uncond_ctx = jnp.full((SHAPE[0], 2), 2.0), jnp.full((SHAPE[0], 2), 0.5)
  model = guidance.guided_model_fn(net, cond_ctx, uncond_ctx, 4.0, guidance_rescale=0.5)
  out = model(x, t)
  assert calls == [2 * SHAPE[0]]  # one doubled batch
  expected = guidance.rescale(guidance.cfg(net(x, t, uncond_ctx), net(x, t, cond_ctx), 4.0), net(x, t, cond_ctx), 0.5)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  unguided = guidance.guided_model_fn(net, cond_ctx, uncond_ctx, 1.0)
  np.testing.assert_allclose(unguided(x, t), net(x, t, cond_ctx))
