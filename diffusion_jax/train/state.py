"""The training state of one stage: parameters, optimizer state, EMA weights, counters.

A `TrainState` is a pytree, so it goes through `jax.jit` (with shardings and donation) as one
argument. `frozen` holds the networks the stage uses but does not train (the VAE and the text
encoder of the diffusion stage, or the cached unconditional text states); they pass through the
step unchanged.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """Everything a train step reads and writes."""
  step: jax.Array  # int32 []: steps taken in this stage (skipped non-finite steps included)
  params: Any  # the trained parameters (float32)
  opt_state: Any  # the optax state
  ema_params: Any  # exponential moving average of `params`, or None when EMA is off
  nonfinite: jax.Array  # int32 []: consecutive steps whose loss or gradient was not finite
  nonfinite_total: jax.Array  # int32 []: all such steps in this stage
  frozen: Any = None  # untrained inputs of the loss (a pytree of arrays), passed through

  def counters(self) -> dict[str, jax.Array]:
    """The scalar bookkeeping, as one checkpoint item."""
    return {"step": self.step, "nonfinite": self.nonfinite, "nonfinite_total": self.nonfinite_total}

  def with_counters(self, counters: dict[str, Any]) -> "TrainState":
    return self.replace(**{k: jnp.asarray(v, jnp.int32) for k, v in counters.items()})


def create(params: Any, tx: optax.GradientTransformation, *, use_ema: bool, frozen: Any = None) -> TrainState:
  """A fresh state at step 0 (the EMA starts as a copy of the parameters)."""
  zero = jnp.zeros((), jnp.int32)
  ema = jax.tree.map(jnp.array, params) if use_ema else None
  return TrainState(step=zero, params=params, opt_state=tx.init(params), ema_params=ema, nonfinite=zero,
                    nonfinite_total=zero, frozen=frozen)


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """The EMA decay at `step`, warmed up as min(decay, (1 + step) / (10 + step)).

  Early on the average follows the parameters closely, so short runs get a useful average too.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)
