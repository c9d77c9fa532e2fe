"""Parametrisations of the denoiser (eps, v, x0), their conversions, training targets and loss weights.

With x_t = alpha * x0 + sigma * eps and alpha**2 + sigma**2 = 1 (alpha = sqrt(alphas_cumprod[t])):
  "epsilon":      the network predicts eps
  "v_prediction": the network predicts v = alpha * eps - sigma * x0 (Salimans & Ho 2022)
  "sample":       the network predicts x0
`alpha` and `sigma` may be scalars or per-example [B] arrays; [B] arrays broadcast over the other axes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_example(a, x):
  """[B] -> [B, 1, ..., 1] so that it broadcasts against x; scalars pass through."""
  a = jnp.asarray(a)
  if a.ndim == 1 and x.ndim > 1:
    a = a.reshape((-1,) + (1,) * (x.ndim - 1))
  return a


def _check(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def alpha_sigma(alphas_cumprod, timesteps):
  """(alpha, sigma) = (sqrt(a), sqrt(1 - a)) with a = alphas_cumprod[timesteps]; [B] each."""
  a = jnp.asarray(alphas_cumprod)[timesteps]
  return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def add_noise(x0, noise, alphas_cumprod, timesteps):
  """q(x_t | x0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, as diffusers' `scheduler.add_noise`."""
  alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
  return _per_example(alpha, x0) * x0 + _per_example(sigma, x0) * noise


def get_velocity(x0, noise, alpha, sigma):
  """v = alpha * eps - sigma * x0, as diffusers' `scheduler.get_velocity`."""
  return _per_example(alpha, x0) * noise - _per_example(sigma, x0) * x0


def training_target(x0, noise, alpha, sigma, prediction_type: str):
  """What the network should output for x_t = alpha * x0 + sigma * noise."""
  _check(prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return get_velocity(x0, noise, alpha, sigma)
  return x0


def to_x0(model_output, x_t, alpha, sigma, prediction_type: str):
  """The denoised sample x0 implied by the model output at x_t."""
  _check(prediction_type)
  alpha, sigma = _per_example(alpha, x_t), _per_example(sigma, x_t)
  if prediction_type == "epsilon":
    return (x_t - sigma * model_output) / alpha
  if prediction_type == "v_prediction":
    return alpha * x_t - sigma * model_output
  return model_output


def to_eps(model_output, x_t, alpha, sigma, prediction_type: str):
  """The noise eps implied by the model output at x_t."""
  _check(prediction_type)
  alpha, sigma = _per_example(alpha, x_t), _per_example(sigma, x_t)
  if prediction_type == "epsilon":
    return model_output
  if prediction_type == "v_prediction":
    return alpha * model_output + sigma * x_t
  return (x_t - alpha * model_output) / sigma


def to_v(model_output, x_t, alpha, sigma, prediction_type: str):
  """The velocity v implied by the model output at x_t."""
  _check(prediction_type)
  if prediction_type == "v_prediction":
    return model_output
  x0 = to_x0(model_output, x_t, alpha, sigma, prediction_type)
  eps = to_eps(model_output, x_t, alpha, sigma, prediction_type)
  return get_velocity(x0, eps, alpha, sigma)


def convert(model_output, x_t, alpha, sigma, from_type: str, to_type: str):
  """Re-expresses a model output in another parametrisation."""
  _check(to_type)
  fn = {"epsilon": to_eps, "v_prediction": to_v, "sample": to_x0}[to_type]
  return fn(model_output, x_t, alpha, sigma, from_type)


def snr(alphas_cumprod, timesteps):
  """Signal-to-noise ratio alpha**2 / sigma**2 at the timesteps, [B] (diffusers' `compute_snr`)."""
  alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
  return (alpha / sigma) ** 2


def min_snr_weights(snr_values, gamma: float, prediction_type: str):
  """Min-SNR-gamma loss weights (Hang et al. 2023) for a plain MSE on the given parametrisation.

  The paper weights the x0 loss by min(SNR, gamma). Since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
  and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, the MSE on eps is weighted by min(SNR, gamma) / SNR
  and on v by min(SNR, gamma) / (SNR + 1). Written as min(1, gamma / SNR) for eps so that SNR = 0 (zero
  terminal SNR) gives weight 1 rather than 0 / 0.
  """
  _check(prediction_type)
  snr_values = jnp.asarray(snr_values, jnp.float32)
  clipped = jnp.minimum(snr_values, gamma)
  if prediction_type == "epsilon":
    return jnp.minimum(1.0, gamma / snr_values)
  if prediction_type == "v_prediction":
    return clipped / (snr_values + 1.0)
  return clipped


def diffusion_loss(model_output, x0, noise, alpha, sigma, prediction_type: str, weights=None):
  """Per-example mean squared error to the parametrisation's target, optionally weighted: [B]."""
  target = training_target(x0, noise, alpha, sigma, prediction_type)
  err = jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32))
  per_example = err.reshape(err.shape[0], -1).mean(axis=1)
  if weights is not None:
    per_example = per_example * jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
  return per_example
