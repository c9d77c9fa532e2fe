"""Classifier-free guidance (Ho & Salimans 2021) and guidance rescale (Lin et al. 2023, section 3.4)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cfg(uncond, cond, scale):
  """Guided model output: uncond + scale * (cond - uncond). Works for eps, v and x0 outputs alike."""
  return uncond + scale * (cond - uncond)


def rescale(guided, cond, guidance_rescale):
  """Rescales the guided output to the per-example std of the conditional one, mixed by `guidance_rescale`.

  Identical to diffusers' `rescale_noise_cfg`: std over all axes but the batch (unbiased, like torch),
  then guidance_rescale * guided * std(cond) / std(guided) + (1 - guidance_rescale) * guided.
  """
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
  std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
  rescaled = guided * (std_cond / std_guided)  # fixes over-exposure at high guidance scales
  return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


rescale_noise_cfg = rescale  # diffusers' name


def guided_model_fn(net_fn, context, uncond_context, guidance_scale, guidance_rescale=0.0):
  """Wraps `net_fn(x, t, context)` into the `model_fn(x, t)` the samplers call, with guidance.

  `context` and `uncond_context` are arrays or matching trees of batch-first arrays (a pipeline's
  conditioning dicts). Evaluates the unconditional and conditional branches in one doubled batch
  (unconditional first, as diffusers). A Python `guidance_scale <= 1` skips guidance like diffusers'
  pipelines; the rescale is applied when `guidance_rescale` is a non-zero Python number or any array.
  """
  if isinstance(guidance_scale, (int, float)) and guidance_scale <= 1.0:
    return lambda x, t: net_fn(x, t, context)
  use_rescale = not isinstance(guidance_rescale, (int, float)) or guidance_rescale > 0
  both_contexts = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond_context, context)

  def model_fn(x, t):  # [B, h, w, C], [B]
    both = net_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_contexts)
    uncond, cond = jnp.split(both, 2)
    guided = cfg(uncond, cond, guidance_scale)
    return rescale(guided, cond, guidance_rescale) if use_rescale else guided

  return model_fn
