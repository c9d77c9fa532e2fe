"""Configuration checks before compiling, the configs themselves, and stopping on non-finite steps."""
import dataclasses
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import hardware
from diffusion_jax.nn import autoencoder as ae
from diffusion_jax.nn.image_encoder import VisionConfig
from diffusion_jax.nn.text_encoder import TextEncoderConfig
from diffusion_jax.nn.unet import UNetConfig
from diffusion_jax.train import autoencoder as ae_stage
from diffusion_jax.train import clip as clip_stage
from diffusion_jax.train import diffusion as diffusion_stage
from diffusion_jax.train import validate
from tests.train_helpers import ROOT, default_config

from configs import sd15, sd21, smoke  # noqa: E402  (ROOT is on sys.path via train_helpers)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c.autoencoder.update(learning_rate=-1.0), "config.autoencoder.learning_rate must be positive"),
    (lambda c: c.clip.update(learning_rate=0.0), "config.clip.learning_rate must be positive"),
    (lambda c: c.update(stages=("autoencoder", "painting")), "unknown stage 'painting'"),
    (lambda c: c.diffusion.sample.update(sampler="plms"), "unknown sampler 'plms'"),
    (lambda c: c.diffusion.update(batch_size=30, microbatches=4), "not divisible by microbatches"),
    (lambda c: c.update(stages=("diffusion",)), "needs a VAE and a text encoder"),
    (lambda c: c.diffusion.update(caption_dropout=1.5), "caption_dropout must be in [0, 1)"),
    (lambda c: c.mesh.update(tensor=2), "unknown mesh axis 'tensor'"),
    (lambda c: c.update(dtype="float64"), "config.dtype must be one of"),
    (lambda c: c.clip.update(xla_scheduler="fast"), "config.clip.xla_scheduler must be one of"),
    # Module fields that follow from the other stages, and values the module config refuses.
    (lambda c: c.diffusion.unet.update(cross_attention_dim=128),
     "config.diffusion.unet.cross_attention_dim is 128 but the text encoder's width is 64"),
    (lambda c: c.diffusion.unet.update(in_channels=8), "config.diffusion.unet.in_channels is 8 but the VAE's latent"),
    (lambda c: c.autoencoder.model.update(sample_size=32), "config.autoencoder.model.sample_size is 32"),
    (lambda c: c.clip.model.vision.update(image_size=32), "config.clip.model.vision.image_size is 32"),
    (lambda c: c.diffusion.unet.update(remat="sometimes"), "config.diffusion.unet: UNetConfig.remat 'sometimes'"),
])
def test_invalid_configs_are_rejected(mutate, fragment):
  config = default_config.get_config()
  mutate(config)
  with pytest.raises(validate.ConfigError) as err:
    validate.check(config)
  assert fragment in str(err.value) and "\n" not in str(err.value)


def test_batch_must_split_over_devices():
  config = default_config.get_config()
  validate.check(config)
  validate.check_devices(config, 1, 1)
  config.autoencoder.batch_size = 18
  with pytest.raises(validate.ConfigError, match="autoencoder.batch_size 18 .* not divisible by the 4 devices"):
    validate.check_devices(config, 4, 1)


def test_configs_load_and_validate():
  for module in (default_config, smoke):
    validate.check(module.get_config())
  for module in (sd15, sd21):
    config = module.get_config()
    assert config.stages == ("diffusion",) and config.dtype == "bfloat16"
    assert config.mesh.fsdp > 1 and config.diffusion.unet.remat != "none"
    with pytest.raises(validate.ConfigError, match="set config.diffusion.init_from"):
      validate.check(config)  # the SD directory must be given on the command line


# The module configs that configs/default.py and smoke.py gave before their sections were spelled field by
# field (captured from the hand-written translation they replaced).
BEFORE = {
    "default": {
        "vae": dict(block_out_channels=(16, 32, 32), force_upcast=True, in_channels=3, latent_channels=4,
            latents_mean=None, latents_std=None, layers_per_block=1, mid_block_add_attention=True, norm_num_groups=8,
            out_channels=3, remat=False, sample_size=64, scaling_factor=1.0, shift_factor=None,
            use_post_quant_conv=True, use_quant_conv=True),
        "unet": dict(attention_head_dim=4, block_out_channels=(32, 64, 64), center_input_sample=False,
            conv_in_kernel=3, conv_out_kernel=3, cross_attention_dim=64, down_block_types=("DownBlock2D",
            "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), dropout=0.0, flip_sin_to_cos=True, freq_shift=0,
            in_channels=4, layers_per_block=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05,
            norm_num_groups=16, num_attention_heads=None, only_cross_attention=False, out_channels=4, remat="none",
            sample_size=16, time_embedding_dim=None, transformer_layers_per_block=1,
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), upcast_attention=False,
            use_linear_projection=False),
        "clip.text": dict(bos_token_id=593, eos_token_id=594, hidden_act="quick_gelu", hidden_size=64,
            intermediate_size=256, layer_norm_eps=1e-05, max_position_embeddings=16, num_heads=2, num_layers=2,
            pad_token_id=594, projection_dim=64, vocab_size=595),
        "clip.vision": dict(hidden_act="quick_gelu", hidden_size=64, image_size=64, intermediate_size=256,
            layer_norm_eps=1e-05, num_channels=3, num_heads=2, num_layers=2, patch_size=8, projection_dim=64),
        "clip": dict(logit_scale_init_value=2.6592, projection_dim=64),
    },
    "smoke": {
        "vae": dict(block_out_channels=(8, 16), force_upcast=True, in_channels=3, latent_channels=4,
            latents_mean=None, latents_std=None, layers_per_block=1, mid_block_add_attention=False,
            norm_num_groups=8, out_channels=3, remat=False, sample_size=32, scaling_factor=1.0, shift_factor=None,
            use_post_quant_conv=True, use_quant_conv=True),
        "unet": dict(attention_head_dim=2, block_out_channels=(16,), center_input_sample=False, conv_in_kernel=3,
            conv_out_kernel=3, cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D",), dropout=0.0,
            flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=1,
            mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=8, num_attention_heads=None,
            only_cross_attention=False, out_channels=4, remat="none", sample_size=16, time_embedding_dim=None,
            transformer_layers_per_block=1, up_block_types=("CrossAttnUpBlock2D",), upcast_attention=False,
            use_linear_projection=False),
        "clip.text": dict(bos_token_id=593, eos_token_id=594, hidden_act="quick_gelu", hidden_size=32,
            intermediate_size=128, layer_norm_eps=1e-05, max_position_embeddings=16, num_heads=2, num_layers=1,
            pad_token_id=594, projection_dim=32, vocab_size=595),
        "clip.vision": dict(hidden_act="quick_gelu", hidden_size=32, image_size=32, intermediate_size=128,
            layer_norm_eps=1e-05, num_channels=3, num_heads=2, num_layers=1, patch_size=8, projection_dim=32),
        "clip": dict(logit_scale_init_value=2.6592, projection_dim=32),
    },
}


def _module_configs(config):
  vae = ae_stage.model_config(config)
  clip = clip_stage.model_config(config, clip_stage.make_tokenizer(config))
  unet = diffusion_stage.unet_config(config, vae.latent_channels, config.data.image_size // vae.downsample_factor,
                                     clip.text.hidden_size)
  return {"vae": vae, "unet": unet, "clip.text": clip.text, "clip.vision": clip.vision,
          "clip": {"projection_dim": clip.projection_dim, "logit_scale_init_value": clip.logit_scale_init_value}}


@pytest.mark.parametrize("name,module", [("default", default_config), ("smoke", smoke)])
def test_configs_build_the_same_modules_as_before(name, module):
  built = _module_configs(module.get_config())
  for part, fields in BEFORE[name].items():
    for field, value in fields.items():
      got = built[part][field] if isinstance(built[part], dict) else getattr(built[part], field)
      assert got == value, f"{name} {part}.{field}: {got!r} != {value!r}"


def test_config_sections_spell_every_module_field():
  config = default_config.get_config()
  for section, cls in ((config.autoencoder.model, ae.AutoencoderConfig), (config.diffusion.unet, UNetConfig),
                       (config.clip.model.text, TextEncoderConfig), (config.clip.model.vision, VisionConfig)):
    assert set(section.keys()) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
  # The implementation choices are made for the devices: "auto" in the config, a value once configured.
  for cfg in (ae_stage.model_config(config), _module_configs(config)["unet"]):
    chosen = hardware.configure(cfg, jax.devices()[:1], jnp.float32)
    for field in hardware.FIELDS:
      if hasattr(cfg, field):
        assert getattr(cfg, field) == "auto" and getattr(chosen, field) != "auto", field


def test_derived_fields_set_consistently_are_accepted():
  config = default_config.get_config()
  config.diffusion.unet.update(cross_attention_dim=64, in_channels=4, out_channels=4, sample_size=16,
                               dropout=0.1, num_attention_heads=2)
  config.diffusion.unet.ff_chunk_elements = "4096"  # as the command line gives a number for an "auto" field
  validate.check(config)
  unet = _module_configs(config)["unet"]
  assert (unet.dropout, unet.heads_per_block, unet.ff_chunk_elements) == (0.1, (2, 2, 2), 4096)


@pytest.mark.parametrize("stats", [dict(shift_factor=0.25),
                                   dict(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(2.0, 1.0, 0.5, 4.0))])
def test_training_latents_are_scale_latents(stats):
  vae_config = ae.AutoencoderConfig(scaling_factor=0.5, **stats)
  keys = jax.random.split(jax.random.key(0), 2)
  mean = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
  logvar = jax.random.normal(jax.random.key(2), (2, 4, 4, 4)) - 2.0
  noise = jax.vmap(lambda k: jax.random.normal(k, (4, 4, 4)))(keys)
  expected = ae.scale_latents(mean + jnp.exp(0.5 * logvar) * noise, vae_config)
  got = diffusion_stage.posterior_latents(keys, mean, logvar, vae_config)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(got, (mean + jnp.exp(0.5 * logvar) * noise) * 0.5)  # the statistics are applied


def _train(tmp_path, *flags, timeout=300):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "smoke.py"),
       "--workdir", str(tmp_path / "run"), "--config.data.data_dir", str(tmp_path / "data"),
       "--config.compilation_cache_dir", "", *flags],
      capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("flag,fragment", [
    ("--config.autoencoder.learning_rate=-0.1", "learning_rate must be positive"),
    ("--config.diffusion.sample.sampler=plms", "unknown sampler 'plms'"),
    ("--config.stages=('autoencoder', 'upscaler')", "unknown stage 'upscaler'"),
])
def test_train_script_exits_before_compiling(tmp_path, flag, fragment):
  start = time.perf_counter()
  proc = _train(tmp_path, flag, timeout=120)
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("train.py: error:") and fragment in lines[0], proc.stderr
  assert not (tmp_path / "run").exists()  # nothing was written, nothing compiled
  assert time.perf_counter() - start < 60


def test_nonfinite_run_stops_and_keeps_the_checkpoint_before_the_fault(tmp_path):
  """NaN inputs from stage step 10 on: the run stops after 3 such steps, the step-8 checkpoint stays."""
  proc = _train(tmp_path, "--config.stages=('autoencoder',)", "--config.debug.nan_stage=autoencoder",
                "--config.debug.nan_from_step=9", "--config.debug.nan_steps=100",
                "--config.max_consecutive_nonfinite=3")
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("train.py: error: stage autoencoder: loss or gradients not finite for 3 consecutive")
  assert "(stage steps 10-12)" in last and "the checkpoint at step 8 is kept" in last, last
  workdir = tmp_path / "run"
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == 8
  from diffusion_jax.checkpoint import Checkpointer
  with Checkpointer.for_workdir(str(workdir)) as ckpt:
    restored = ckpt.restore(8, abstract_items={"vae": None, "vae_counters": None})
  assert int(restored.items["vae_counters"]["nonfinite_total"]) == 0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.items["vae"]))
  logged = (workdir / "metrics.jsonl").read_text()
  assert '"skipped": 3.0' in logged  # the stopping step logs the faults (steps 9-12: 10, 11, 12)
