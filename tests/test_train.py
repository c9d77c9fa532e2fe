"""The train step of each stage reduces its loss on a tiny batch; the losses match their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.nn import clip as clip_nn
from diffusion_jax.train import autoencoder as ae_stage
from diffusion_jax.train import clip as clip_stage

from tests import train_helpers as h


def test_autoencoder_step_reduces_loss():
  model, params, batch, cfg = h.vae_setup()
  loss_fn = ae_stage.make_loss(model, cfg)
  before = h.loss_at(loss_fn, params, None, batch)
  state, metrics = h.run_steps(loss_fn, params, batch, 12)
  after = h.loss_at(loss_fn, state.params, None, batch)
  assert after < 0.7 * before, (before, after)
  assert int(state.step) == 12 and int(state.nonfinite_total) == 0
  assert set(metrics) >= {"loss", "l1", "mse", "kl_per_element", "grad_norm", "skipped"}


def test_autoencoder_loss_is_l1_plus_l2_plus_scaled_kl():
  model, params, batch, cfg = h.vae_setup()
  cfg = cfg.copy_and_resolve_references()
  cfg.update(crop_size=0, l1_weight=0.5, l2_weight=2.0, kl_weight=1e-3)
  keys = h.fixed_keys(4)
  loss, _ = jax.jit(lambda p, b: ae_stage.make_loss(model, cfg)(p, None, b))(params, dict(batch, rng=keys))
  x = batch["image"]
  mean, logvar = model.apply({"params": params}, x, method="encode")
  noise = jnp.stack([jax.random.normal(jax.random.split(k, 2)[1], mean.shape[1:]) for k in keys])
  recon = model.apply({"params": params}, mean + jnp.exp(0.5 * logvar) * noise, method="decode")
  kl = np.mean(0.5 * np.sum(np.square(mean) + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))) / (16 * 16 * 3)
  expected = 0.5 * np.mean(np.abs(recon - x)) + 2.0 * np.mean(np.square(recon - x)) + 1e-3 * kl
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_clip_step_reduces_loss_and_the_temperature_is_clamped():
  config = h.small_clip_config()
  tokenizer = clip_stage.make_tokenizer(config)
  model = clip_nn.CLIP(clip_stage.model_config(config, tokenizer))
  params = h.init_params(model, jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 16, 16, 3)))
  assert np.isclose(float(params["logit_scale"]), np.log(1 / 0.07), atol=1e-4)
  images, captions = h.shapes_images(8)
  batch = {"image": jnp.asarray(images), "tokens": jnp.asarray(tokenizer(list(captions)))}
  loss_fn = clip_stage.make_loss(model)
  before = h.loss_at(loss_fn, params, None, batch)
  state, _ = h.run_steps(loss_fn, params, batch, 30, lr=1e-3)
  after = h.loss_at(loss_fn, state.params, None, batch)
  assert after < 0.5 * before, (before, after)

  # Symmetric InfoNCE: the mean of the text->image and image->text cross-entropies, logits scaled by
  # exp(logit_scale) clamped at 100.
  hot = dict(state.params, logit_scale=jnp.float32(8.0))  # exp(8) ~ 2981 > 100
  loss, metrics = jax.jit(lambda p, b: loss_fn(p, None, b))(hot, dict(batch, rng=h.fixed_keys(8)))
  assert np.isclose(metrics["temperature"], 100.0, rtol=1e-5)
  text = model.apply({"params": hot}, batch["tokens"], method="encode_text")
  image = model.apply({"params": hot}, batch["image"], method="encode_image")
  logits = 100.0 * np.asarray(text) @ np.asarray(image).T  # [texts, images]
  def xent(l):
    l = l - l.max(axis=1, keepdims=True)
    return -np.mean(np.diagonal(l) - np.log(np.exp(l).sum(axis=1)))
  np.testing.assert_allclose(loss, (xent(logits) + xent(logits.T)) / 2, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("cached,prediction_type", [(True, "epsilon"), (False, "v_prediction")])
def test_diffusion_step_reduces_loss(cached, prediction_type):
  loss_fn, params, frozen, batch = h.diffusion_setup(cached, prediction_type)
  before = h.loss_at(loss_fn, params, frozen, batch)
  state, metrics = h.run_steps(loss_fn, params, batch, 12, frozen=frozen, ema_decay=0.9)
  after = h.loss_at(loss_fn, state.params, frozen, batch)
  # The v target is harder for a 12-step tiny UNet (about 0.85x here; eps about 0.6x).
  assert after < (0.9 if prediction_type == "v_prediction" else 0.8) * before, (before, after)
  # Frozen networks pass through unchanged; the EMA moved towards the parameters.
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(state.ema_params["conv_in"]["kernel"], params["conv_in"]["kernel"])
  assert 0.0 <= float(metrics["caption_dropped"]) <= 1.0


@pytest.mark.slow
def test_cached_and_on_the_fly_diffusion_losses_agree():
  """Cached posteriors and text states give the loss that encoding at every step gives."""
  on_the_fly = h.diffusion_setup(cached=False)
  cached = h.diffusion_setup(cached=True)
  a = h.loss_at(*on_the_fly)
  b = h.loss_at(*cached)
  np.testing.assert_allclose(a, b, rtol=1e-5)
