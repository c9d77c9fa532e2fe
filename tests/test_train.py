"""Train steps of the three stages, gradient accumulation, the non-finite guard, EMA, config checks."""
import dataclasses
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax.data import shapes
from diffusion_jax.diffusion.schedules import SchedulerConfig
from diffusion_jax.nn import autoencoder as ae
from diffusion_jax.nn import clip as clip_nn
from diffusion_jax.nn import unet as unet_lib
from diffusion_jax.nn.text_encoder import TextEncoder
from diffusion_jax.train import autoencoder as ae_stage
from diffusion_jax.train import clip as clip_stage
from diffusion_jax.train import diffusion as diffusion_stage
from diffusion_jax.train import optim, validate
from diffusion_jax.train import state as state_lib
from diffusion_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default as default_config  # noqa: E402
from configs import smoke as smoke_config  # noqa: E402

TINY_VAE = ae.AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                sample_size=16, scaling_factor=1.0, mid_block_add_attention=False)


def shapes_images(n, size=16):
  """n `shapes` test images resized to size x size, float32 in [-1, 1], and their captions."""
  from PIL import Image
  images, captions = [], []
  for i in range(n):
    ex = shapes.generate_example("test", i)
    images.append(np.asarray(Image.fromarray(ex["image"]).resize((size, size), Image.BOX)))
    captions.append(ex["caption"])
  return np.stack(images).astype(np.float32) / 127.5 - 1.0, captions


def training_cfg(**overrides):
  cfg = default_config.training(steps=20, batch_size=4, learning_rate=3e-3, warmup_steps=0)
  cfg.update(overrides)
  return cfg


def fixed_keys(batch_size, seed=123):
  return jax.random.split(jax.random.key(seed), batch_size)


def run_steps(loss_fn, params, batch, steps, *, frozen=None, lr=3e-3, microbatches=1, ema_decay=0.0):
  tx = optim.make_optimizer(training_cfg(learning_rate=lr, steps=steps))
  state = state_lib.create(params, tx, use_ema=ema_decay > 0, frozen=frozen)
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, microbatches=microbatches, ema_decay=ema_decay))
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(0))
  return state, metrics


def loss_at(loss_fn, params, frozen, batch):
  """The loss with fixed per-example keys, so that values before and after training compare."""
  b = dict(batch, rng=fixed_keys(step_lib.batch_size_of(batch)))
  return float(loss_fn(params, frozen, b)[0])


# ------------------------------------------------------------------------------------------ stages


@pytest.fixture(scope="module")
def vae_setup():
  model = ae.AutoencoderKL(TINY_VAE)
  params = nn.meta.unbox(ae_stage.init_fn(model, 16)(jax.random.key(0)))
  images, captions = shapes_images(4)
  cfg = training_cfg(l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6, crop_size=8)
  return model, params, {"image": jnp.asarray(images)}, cfg, captions


def test_autoencoder_step_reduces_loss(vae_setup):
  model, params, batch, cfg, _ = vae_setup
  loss_fn = ae_stage.make_loss(model, cfg)
  before = loss_at(loss_fn, params, None, batch)
  state, metrics = run_steps(loss_fn, params, batch, 15)
  after = loss_at(loss_fn, state.params, None, batch)
  assert after < 0.7 * before, (before, after)
  assert int(state.step) == 15 and int(state.nonfinite_total) == 0
  assert set(metrics) >= {"loss", "l1", "mse", "kl_per_element", "grad_norm", "skipped"}


def test_clip_step_reduces_loss():
  tokenizer = clip_stage.make_tokenizer(default_config.get_config())
  config = default_config.get_config()
  config.data.image_size = 16
  config.clip.model.update(text_width=32, text_layers=1, text_heads=2, vision_width=32, vision_layers=1,
                           vision_heads=2, patch_size=8, projection_dim=32)
  model = clip_nn.CLIP(clip_stage.model_config(config, tokenizer))
  params = nn.meta.unbox(clip_stage.init_fn(model)(jax.random.key(0)))
  assert np.isclose(float(params["logit_scale"]), np.log(1 / 0.07), atol=1e-4)
  images, captions = shapes_images(8)
  batch = {"image": jnp.asarray(images), "tokens": jnp.asarray(tokenizer(captions))}
  loss_fn = clip_stage.make_loss(model)
  before = loss_at(loss_fn, params, None, batch)
  state, metrics = run_steps(loss_fn, params, batch, 30, lr=1e-3)
  after = loss_at(loss_fn, state.params, None, batch)
  assert after < 0.5 * before, (before, after)
  # The symmetric InfoNCE: mean of the two cross-entropies over the [N, N] logits.
  _, logits = model.apply({"params": state.params}, batch["tokens"], batch["image"])
  logp_t = jax.nn.log_softmax(logits, axis=1)
  logp_i = jax.nn.log_softmax(logits, axis=0)
  expected = -(jnp.mean(jnp.diagonal(logp_t)) + jnp.mean(jnp.diagonal(logp_i))) / 2
  assert np.isclose(loss_fn(state.params, None, dict(batch, rng=fixed_keys(8)))[0], expected, rtol=1e-5)


def test_clip_temperature_is_clamped_at_100():
  config = default_config.get_config()
  config.data.image_size = 16
  config.clip.model.update(text_width=16, text_layers=1, text_heads=1, vision_width=16, vision_layers=1,
                           vision_heads=1, patch_size=8, projection_dim=16)
  tokenizer = clip_stage.make_tokenizer(config)
  model = clip_nn.CLIP(clip_stage.model_config(config, tokenizer))
  params = nn.meta.unbox(clip_stage.init_fn(model)(jax.random.key(0)))
  params = dict(params, logit_scale=jnp.float32(8.0))  # exp(8) ~ 2981
  images, captions = shapes_images(2)
  _, metrics = clip_stage.make_loss(model)(params, None, {"image": jnp.asarray(images),
                                                           "tokens": jnp.asarray(tokenizer(captions))})
  assert np.isclose(metrics["temperature"], 100.0, rtol=1e-5)


def diffusion_setup(cached: bool, prediction_type="epsilon", min_snr_gamma=5.0):
  vae = ae.AutoencoderKL(TINY_VAE)
  vae_params = nn.meta.unbox(vae.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)), sample_posterior=False)["params"])
  config = default_config.get_config()
  tokenizer = clip_stage.make_tokenizer(config)
  text_cfg = clip_stage.model_config(config, tokenizer).text
  text_cfg = dataclasses.replace(text_cfg, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
  text = TextEncoder(text_cfg)
  text_params = nn.meta.unbox(text.init(jax.random.key(2), jnp.zeros((1, 16), jnp.int32))["params"])
  unet_cfg = unet_lib.UNetConfig(sample_size=8, block_out_channels=(16,), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                 attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8)
  unet = unet_lib.UNet(unet_cfg)
  params = nn.meta.unbox(unet.init(jax.random.key(3), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                                   jnp.zeros((1, 16, 16)))["params"])
  cfg = training_cfg(caption_dropout=0.25, min_snr_gamma=min_snr_gamma)
  sched = SchedulerConfig(prediction_type=prediction_type)
  images, captions = shapes_images(4)
  tokens = tokenizer(captions)
  empty = tokenizer([""])[0]
  frozen = {"latent_scale": jnp.float32(0.5)}
  if cached:
    mean, logvar = vae.apply({"params": vae_params}, jnp.asarray(images), method="encode")
    context = text.apply({"params": text_params}, jnp.asarray(tokens))[0]
    frozen["uncond_context"] = text.apply({"params": text_params}, jnp.asarray(empty[None]))[0][0]
    batch = {"latent_mean": mean, "latent_logvar": logvar, "context": context}
  else:
    frozen.update(vae=vae_params, text_encoder=text_params)
    batch = {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens)}
  loss_fn = diffusion_stage.make_loss(unet, vae, text, sched, cfg, empty)
  return loss_fn, params, frozen, batch


@pytest.mark.parametrize("cached,prediction_type", [(True, "epsilon")])
def test_diffusion_step_reduces_loss(cached, prediction_type):
  loss_fn, params, frozen, batch = diffusion_setup(cached, prediction_type)
  before = loss_at(loss_fn, params, frozen, batch)
  state, _ = run_steps(loss_fn, params, batch, 12, frozen=frozen, ema_decay=0.9)
  after = loss_at(loss_fn, state.params, frozen, batch)
  assert after < 0.9 * before, (before, after)
  # Frozen networks pass through unchanged; the EMA moved towards the parameters.
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(state.ema_params["conv_in"]["kernel"], params["conv_in"]["kernel"])


def test_cached_and_on_the_fly_diffusion_losses_agree():
  """Cached posteriors and text states give the loss that encoding at every step gives."""
  on_the_fly = diffusion_setup(cached=False)
  cached = diffusion_setup(cached=True)
  a = loss_at(on_the_fly[0], on_the_fly[1], on_the_fly[2], on_the_fly[3])
  b = loss_at(cached[0], cached[1], cached[2], cached[3])
  np.testing.assert_allclose(a, b, rtol=1e-5)


# ------------------------------------------------------------------------------------------ accumulation


def _rel(a, b):
  return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)) / optax.tree.norm(b))


@pytest.mark.parametrize("which", ["autoencoder", "diffusion"])
def test_gradient_accumulation_matches_the_whole_batch(which, vae_setup):
  if which == "autoencoder":
    model, params, batch, cfg, _ = vae_setup
    loss_fn, frozen = ae_stage.make_loss(model, cfg), None
  else:
    loss_fn, params, frozen, batch = diffusion_setup(cached=True)
  batch = dict(batch, rng=fixed_keys(4))
  whole = jax.jit(lambda p: step_lib.accumulate_gradients(loss_fn, p, frozen, batch, 1))(params)
  parts = jax.jit(lambda p: step_lib.accumulate_gradients(loss_fn, p, frozen, batch, 4))(params)
  assert np.isclose(whole[0], parts[0], rtol=1e-5)
  assert _rel(parts[2], whole[2]) < 1e-5


# ------------------------------------------------------------------------------------------ guard, EMA


def test_nonfinite_steps_are_skipped_and_counted(vae_setup):
  model, params, batch, cfg, _ = vae_setup
  loss_fn = ae_stage.make_loss(model, cfg)
  tx = optim.make_optimizer(training_cfg(steps=10))
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, nan_window=(1, 2)))
  state = state_lib.create(params, tx, use_ema=False)
  history = []
  for _ in range(4):
    previous = state
    state, metrics = step(state, batch, jax.random.key(0))
    history.append((previous, state, jax.device_get(metrics)))
  (p0, s0, m0), (p1, s1, m1), (p2, s2, m2), (p3, s3, m3) = history
  assert m0["skipped"] == 0 and m1["skipped"] == 1 and m2["skipped"] == 1 and m3["skipped"] == 0
  assert not np.isfinite(m1["loss"])
  assert [int(m["nonfinite_consecutive"]) for m in (m0, m1, m2, m3)] == [0, 1, 2, 0]
  assert int(s3.nonfinite_total) == 2 and int(s3.step) == 4
  for skipped_from, skipped_to in ((p1, s1), (p2, s2)):  # parameters and optimizer state kept
    for a, b in zip(jax.tree.leaves((skipped_from.params, skipped_from.opt_state)),
                    jax.tree.leaves((skipped_to.params, skipped_to.opt_state))):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(s3.params["encoder"]["conv_in"]["kernel"], s2.params["encoder"]["conv_in"]["kernel"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(s3.params))


def test_ema_update_is_the_moving_average():
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, -2.0])}
  decay = state_lib.ema_decay(jnp.int32(1000), 0.99)
  assert np.isclose(decay, 0.99)
  assert np.isclose(state_lib.ema_decay(jnp.int32(0), 0.99), 0.1)  # warm-up: (1 + 0) / (10 + 0)
  out = state_lib.ema_update(ema, params, decay)
  np.testing.assert_allclose(out["w"], 0.99 * np.array([1.0, 2.0]) + 0.01 * np.array([3.0, -2.0]), rtol=1e-6)


def test_learning_rate_schedule_warms_up_and_decays():
  cfg = training_cfg(steps=100, learning_rate=1e-3, warmup_steps=10, end_lr_factor=0.1)
  sched = optim.learning_rate_schedule(cfg)
  assert float(sched(0)) == 0.0 and np.isclose(float(sched(5)), 5e-4)
  assert np.isclose(float(sched(10)), 1e-3) and np.isclose(float(sched(100)), 1e-4, rtol=1e-4)
  mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 45 / 90))
  assert np.isclose(float(sched(55)), mid, rtol=1e-4)


# ------------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c.autoencoder.update(learning_rate=-1.0), "config.autoencoder.learning_rate must be positive"),
    (lambda c: c.clip.update(learning_rate=0.0), "config.clip.learning_rate must be positive"),
    (lambda c: c.update(stages=("autoencoder", "painting")), "unknown stage 'painting'"),
    (lambda c: c.diffusion.sample.update(sampler="plms"), "unknown sampler 'plms'"),
    (lambda c: c.diffusion.update(batch_size=30, microbatches=4), "not divisible by microbatches"),
    (lambda c: c.update(stages=("diffusion",)), "needs a VAE and a text encoder"),
    (lambda c: c.diffusion.update(caption_dropout=1.5), "caption_dropout must be in [0, 1)"),
    (lambda c: c.mesh.update(tensor=2), "unknown mesh axis 'tensor'"),
])
def test_invalid_configs_are_rejected(mutate, fragment):
  config = default_config.get_config()
  mutate(config)
  with pytest.raises(validate.ConfigError, match=None) as err:
    validate.check(config)
  assert fragment in str(err.value) and "\n" not in str(err.value)


def test_batch_must_split_over_devices():
  config = default_config.get_config()
  validate.check(config)
  validate.check_devices(config, 1, 1)
  config.autoencoder.batch_size = 18
  with pytest.raises(validate.ConfigError, match="autoencoder.batch_size 18 .* not divisible by the 4 devices"):
    validate.check_devices(config, 4, 1)


@pytest.mark.parametrize("flag,fragment", [
    ("--config.autoencoder.learning_rate=-0.1", "learning_rate must be positive"),
    ("--config.diffusion.sample.sampler=plms", "unknown sampler 'plms'"),
])
def test_train_script_exits_before_compiling(tmp_path, flag, fragment):
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                         os.path.join(ROOT, "configs", "smoke.py"), "--workdir", str(tmp_path / "run"), flag],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("train.py: error:") and fragment in lines[0], proc.stderr
  assert not (tmp_path / "run").exists()  # nothing was written, nothing compiled
  assert time.perf_counter() - start < 60


def test_configs_load_and_validate():
  for module in (default_config, smoke_config):
    config = module.get_config()
    validate.check(config)
  from configs import sd15, sd21  # noqa: F401  (they need init_from, checked in their own test)
  for module in (sd15, sd21):
    config = module.get_config()
    assert config.stages == ("diffusion",) and config.dtype == "bfloat16"
    assert config.mesh.fsdp != 1 and config.diffusion.unet.remat != "none"


def test_nonfinite_run_stops_and_keeps_the_checkpoint_before_the_fault(tmp_path):
  """NaN inputs from stage step 10 on: the run stops after 3 such steps, the step-8 checkpoint stays."""
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "smoke.py"),
       "--workdir", str(workdir), "--config.data.data_dir", str(tmp_path / "data"),
       "--config.compilation_cache_dir", "", "--config.stages=('autoencoder',)",
       "--config.debug.nan_stage=autoencoder", "--config.debug.nan_from_step=9", "--config.debug.nan_steps=100",
       "--config.max_consecutive_nonfinite=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("train.py: error: stage autoencoder: loss or gradients not finite for 3 consecutive")
  assert "(stage steps 10-12)" in last and "the checkpoint at step 8 is kept" in last, last
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == 8
  from diffusion_jax.checkpoint import Checkpointer
  with Checkpointer.for_workdir(str(workdir)) as ckpt:
    restored = ckpt.restore(8, abstract_items={"vae": None, "vae_counters": None})
  assert int(restored.items["vae_counters"]["nonfinite_total"]) == 0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.items["vae"]))
