"""The generic train step: gradient accumulation, non-finite skipping, EMA.

Each stage supplies a loss `loss_fn(params, frozen, batch) -> (loss, metrics)` where `batch`
carries one PRNG key per example under "rng" ([B] keys): every random draw of the loss is made
per example from its own key, so splitting the batch into micro-batches gives exactly the
examples, noise and timesteps of the whole batch, and the accumulated gradient equals the
whole-batch gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.train import state as state_lib

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]

def batch_size_of(batch: dict) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def split_microbatches(batch: dict, microbatches: int) -> dict:
  """[B, ...] -> [M, B / M, ...], micro-batch m holding examples m, m + M, m + 2M ...

  The strided split keeps every device's rows in every micro-batch when B is sharded
  along its first axis, so no micro-batch waits on a subset of the devices.
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // microbatches, microbatches) + x.shape[1:])  # [B/M, M, ...]
    return jnp.swapaxes(x, 0, 1)  # [M, B/M, ...]
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params: Any, frozen: Any, batch: dict,
                         microbatches: int = 1) -> tuple[jax.Array, dict, Any]:
  """(loss, metrics, grads) of the whole batch, computed over `microbatches` sequential parts.

  Losses, metrics and gradients are averaged over equally sized micro-batches, which equals the
  whole-batch value for any loss that is a mean over independent examples.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def loss_metrics_grads(b):
    (loss, metrics), grads = grad_fn(params, frozen, b)
    return loss, metrics, grads

  if microbatches == 1:
    return loss_metrics_grads(batch)

  micro = split_microbatches(batch, microbatches)

  def body(total, mb):
    return jax.tree.map(jnp.add, total, loss_metrics_grads(mb)), None

  shapes = jax.eval_shape(loss_metrics_grads, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, micro)
  loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, total)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, metrics, grads


def _poison(batch: dict, bad: jax.Array) -> dict:
  """Replaces every floating input by NaN where `bad` (a test hook for the non-finite guard)."""
  def poison(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.where(bad, jnp.nan, x)
    return x
  return {k: v if k == "rng" else jax.tree.map(poison, v) for k, v in batch.items()}


def all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, microbatches: int = 1,
                    ema_decay: float = 0.0, nan_window: tuple[int, int] | None = None):
  """Builds `train_step(state, batch, rng) -> (state, metrics)`.

  Args:
    loss_fn: `(params, frozen, batch) -> (scalar loss, {name: scalar})`, see the module doc.
    tx: the optimizer.
    microbatches: gradient accumulation: the batch is processed in this many sequential parts.
    ema_decay: > 0 keeps `state.ema_params` as an exponential moving average (warmed up).
    nan_window: (first_step, count): feed NaN inputs at these steps (tests the guard).

  The step draws its randomness from `fold_in(rng, state.step)`. When the loss or any gradient
  is not finite, parameters, optimizer state and EMA are left as they were, and the step is
  counted in `state.nonfinite` (consecutive) and `state.nonfinite_total`.
  """

  def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    batch = dict(batch, rng=jax.random.split(step_rng, batch_size_of(batch)))
    if nan_window is not None:
      first, count = nan_window
      batch = _poison(batch, (state.step >= first) & (state.step < first + count))
    loss, metrics, grads = accumulate_gradients(loss_fn, state.params, state.frozen, batch, microbatches)

    finite = jnp.isfinite(loss) & all_finite(grads)

    def update(trained):
      params, opt_state, ema = trained
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if ema is not None:
        ema = state_lib.ema_update(ema, params, state_lib.ema_decay(state.step, ema_decay))
      return params, opt_state, ema

    # A branch rather than a select of every leaf: XLA compiles the select form several times slower.
    params, opt_state, ema = jax.lax.cond(finite, update, lambda trained: trained,
                                          (state.params, state.opt_state, state.ema_params))
    nonfinite = jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                              nonfinite=nonfinite,
                              nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   skipped=(~finite).astype(jnp.int32), nonfinite_consecutive=nonfinite,
                   nonfinite_total=new_state.nonfinite_total)
    return new_state, metrics

  return train_step
