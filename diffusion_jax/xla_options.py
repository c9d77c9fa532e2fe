"""XLA compiler options for the programs this project compiles, in one table, and `jit`, which adds them.

  step = diffusion_jax.jit(train_step, scheduler="memory", donate_argnums=(0, 1))
  # the same as
  step = jax.jit(train_step, donate_argnums=(0, 1), compiler_options=xla_options.compiler_options("memory"))

Options are per backend; on a TPU or GPU there are none today. An option the installed XLA does not
know is left out (checked once per process), so older and newer jaxlibs compile as before.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

# Options every program gets, by backend. On the CPU, jaxlib 0.10.2's XLA hands convolutions, matmuls
# and reductions to YNNPACK; XLA's own convolutions are faster at nearly every UNet and VAE shape
# (benchmarks/cpu_convolutions.py), so the list below, what YNNPACK runs, leaves convolutions out.
# Reductions must stay with YNNPACK (without it, attention's reductions run as slow reduce-window loops).
BASE = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type":
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
}

# Scheduler choices for train steps: {name: {backend: options}} (`config.<stage>.xla_scheduler`).
# On the CPU, XLA's default scheduler keeps nearly every gradient alive until the last one is
# computed and runs the optimizer update after; the memory-optimised one updates each parameter as
# soon as its gradient is ready: SD 1.5's AdamW step needs less than half the temporaries with it
# (less saved with global-norm clipping, which needs every gradient first), at a small cost in speed
# for small models (benchmarks/unet.py reports both).
SCHEDULERS = {
    "default": {},
    "memory": {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}},
}


def compiler_options(scheduler: str = "default", backend: str | None = None) -> dict:
  """`compiler_options` for `jax.jit` on `backend` (default: JAX's default backend)."""
  if scheduler not in SCHEDULERS:
    raise ValueError(f"unknown XLA scheduler {scheduler!r}: use one of {sorted(SCHEDULERS)}")
  backend = backend or jax.default_backend()
  options = {**BASE.get(backend, {}), **SCHEDULERS[scheduler].get(backend, {})}
  return {name: value for name, value in options.items() if _accepted(backend, name, value)}


@functools.lru_cache(maxsize=None)
def _accepted(backend: str, name: str, value) -> bool:
  """Whether this XLA compiles a tiny program with the option (unknown names and values raise)."""
  if backend != jax.default_backend():
    return True  # cannot probe another backend cheaply; its compile will say so
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(jnp.zeros(2)).compile()
    return True
  except Exception:  # jaxlib raises its own runtime error type for unknown options
    return False


def jit(fn: Callable, *, scheduler: str = "default", **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` with this project's compiler options for the default backend added:
  what the pipeline and training compile with, for users' own programs (a model's `apply`, a train step).

  `scheduler`: "default", or "memory" for train steps that should not hold every gradient at once
  (see SCHEDULERS). Options given in `jit_kwargs["compiler_options"]` take precedence.
  """
  options = {**compiler_options(scheduler), **(jit_kwargs.pop("compiler_options", None) or {})}
  return jax.jit(fn, compiler_options=options, **jit_kwargs)
