"""The generic train step: gradient accumulation, the non-finite guard, EMA and the learning-rate schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax.train import autoencoder as ae_stage
from diffusion_jax.train import optim
from diffusion_jax.train import state as state_lib
from diffusion_jax.train import step as step_lib
from tests import train_helpers as h


def _rel(a, b):
  return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)) / optax.tree.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["autoencoder", "diffusion"])
def test_gradient_accumulation_matches_the_whole_batch(which):
  if which == "autoencoder":
    model, params, batch, cfg = h.vae_setup()
    loss_fn, frozen = ae_stage.make_loss(model, cfg), None
  else:
    loss_fn, params, frozen, batch = h.diffusion_setup(cached=True)
  keyed = dict(batch, rng=h.fixed_keys(4))
  whole = jax.jit(lambda p: step_lib.accumulate_gradients(loss_fn, p, frozen, keyed, 1))(params)
  parts = jax.jit(lambda p: step_lib.accumulate_gradients(loss_fn, p, frozen, keyed, 4))(params)
  assert np.isclose(whole[0], parts[0], rtol=1e-5)
  assert _rel(parts[2], whole[2]) < 1e-5
  assert _rel(parts[1], whole[1]) < 1e-5  # metrics are averaged the same way
  if which == "autoencoder":  # the whole step (clipping, AdamW) lands on the same parameters
    s1, _ = h.run_steps(loss_fn, params, batch, 2, frozen=frozen)
    s2, _ = h.run_steps(loss_fn, params, batch, 2, frozen=frozen, microbatches=2)
    # Adam divides by the gradient's running RMS, so float rounding in near-zero gradients grows
    # to ~1e-4 of the parameters; a wrong accumulation differs by orders of magnitude more.
    assert _rel(s2.params, s1.params) < 1e-3


def test_microbatches_are_strided_slices():
  batch = {"x": jnp.arange(8)}
  np.testing.assert_array_equal(step_lib.split_microbatches(batch, 2)["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_nonfinite_steps_are_skipped_and_counted():
  model, params, batch, cfg = h.vae_setup()
  loss_fn = ae_stage.make_loss(model, cfg)
  tx = optim.make_optimizer(h.training_cfg(steps=10))
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, nan_window=(1, 2), ema_decay=0.9))
  state = state_lib.create(params, tx, use_ema=True)
  history = []
  for _ in range(4):
    previous = state
    state, metrics = step(state, batch, jax.random.key(0))
    history.append((previous, state, jax.device_get(metrics)))
  (_, _, m0), (p1, s1, m1), (p2, s2, m2), (_, s3, m3) = history
  assert [int(m["skipped"]) for m in (m0, m1, m2, m3)] == [0, 1, 1, 0]
  assert not np.isfinite(m1["loss"])
  assert [int(m["nonfinite_consecutive"]) for m in (m0, m1, m2, m3)] == [0, 1, 2, 0]
  assert int(s3.nonfinite_total) == 2 and int(s3.step) == 4
  for before, after in ((p1, s1), (p2, s2)):  # parameters, optimizer state and EMA kept
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.ema_params)),
                    jax.tree.leaves((after.params, after.opt_state, after.ema_params))):
      np.testing.assert_array_equal(a, b)
  kernel = lambda s: s.params["encoder"]["conv_in"]["kernel"]  # noqa: E731
  assert not np.array_equal(kernel(s3), kernel(s2))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((s3.params, s3.opt_state, s3.ema_params)))


def test_ema_update_is_the_moving_average():
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, -2.0])}
  decay = state_lib.ema_decay(jnp.int32(1000), 0.99)
  assert np.isclose(decay, 0.99)
  assert np.isclose(state_lib.ema_decay(jnp.int32(0), 0.99), 0.1)  # warm-up: (1 + 0) / (10 + 0)
  out = state_lib.ema_update(ema, params, decay)
  np.testing.assert_allclose(out["w"], 0.99 * np.array([1.0, 2.0]) + 0.01 * np.array([3.0, -2.0]), rtol=1e-6)


def test_learning_rate_schedule_warms_up_and_decays():
  cfg = h.training_cfg(steps=100, learning_rate=1e-3, warmup_steps=10, end_lr_factor=0.1)
  sched = optim.learning_rate_schedule(cfg)
  assert float(sched(0)) == 0.0 and np.isclose(float(sched(5)), 5e-4)
  assert np.isclose(float(sched(10)), 1e-3) and np.isclose(float(sched(100)), 1e-4, rtol=1e-4)
  mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 45 / 90))
  assert np.isclose(float(sched(55)), mid, rtol=1e-4)


def test_weight_decay_spares_biases_and_norms():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "scale": jnp.ones(())}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False, "scale": False}
