"""AdamW with linear warmup, cosine decay and gradient clipping, built from a stage's config."""
from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(cfg: Any) -> optax.Schedule:
  """0 -> cfg.learning_rate over cfg.warmup_steps, then cosine down to learning_rate * end_lr_factor."""
  warmup = min(int(cfg.warmup_steps), int(cfg.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(cfg.learning_rate), warmup_steps=warmup,
      decay_steps=max(int(cfg.steps), warmup + 1), end_value=float(cfg.learning_rate) * float(cfg.end_lr_factor))


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and conv kernels only (not on biases, norms or scalars)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
  """clip_by_global_norm(cfg.grad_clip_norm) then AdamW(schedule, b1, b2, eps, weight_decay).

  `cfg` is a stage's training config (ConfigDict): learning_rate, warmup_steps, steps,
  end_lr_factor, b1, b2, eps, weight_decay, grad_clip_norm (<= 0: no clipping).
  """
  parts = []
  if float(cfg.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts)
