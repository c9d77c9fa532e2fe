"""Fine-tuning from a diffusers-format directory (config.diffusion.init_from) with train.py."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.convert.safetensors_io import SafetensorsFile
from diffusion_jax.diffusion.schedules import SchedulerConfig
from diffusion_jax.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from diffusion_jax.nn.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_jax.nn.unet import UNet, UNetConfig
from diffusion_jax.pipeline import Pipeline
from diffusion_jax.tokenizer import CLIPTokenizer
from diffusion_jax.train.clip import SHAPES_WORDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_tiny_sd(path):
  """A random tiny SD-style pipeline (v-prediction, DDIM) written with Pipeline.save_pretrained."""
  tokenizer = CLIPTokenizer.from_words(SHAPES_WORDS, max_length=16)
  text_cfg = TextEncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_layers=1,
                               num_heads=2, max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
  vae_cfg = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16,
                              scaling_factor=0.5)
  unet_cfg = UNetConfig(sample_size=8, block_out_channels=(16,), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                        attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8)
  text, vae, unet = TextEncoder(text_cfg), AutoencoderKL(vae_cfg), UNet(unet_cfg)
  params = {
      "text_encoder": text.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"],
      "vae": vae.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)), sample_posterior=False)["params"],
      "unet": unet.init(jax.random.key(2), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 16, 16)))["params"],
  }
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  scheduler = SchedulerConfig(prediction_type="v_prediction", class_name="DDIMScheduler")
  pipe = Pipeline(tokenizer, text, vae, unet, params, scheduler,
                  {"text_encoder": text_cfg, "vae": vae_cfg, "unet": unet_cfg})
  pipe.save_pretrained(path)


def tensors(path):
  f = SafetensorsFile(path)
  out = {k: np.array(f.get_tensor(k)) for k in f.keys()}
  f.close()
  return out


@pytest.mark.slow
def test_finetune_from_diffusers_directory(tmp_path):
  source = tmp_path / "tiny-sd"
  build_tiny_sd(str(source))
  config_file = tmp_path / "finetune.py"
  config_file.write_text(f'''
from configs import smoke

def get_config():
  config = smoke.get_config()
  config.stages = ("diffusion",)
  config.data.image_size = 16
  d = config.diffusion
  d.init_from = {str(source)!r}
  d.prediction_type = ""  # the directory's: v_prediction
  d.cache = False  # encode images and captions at every step
  d.update(steps=4, batch_size=4, checkpoint_every=2, log_every=2, ema_decay=0.0)
  d.sample.update(eval_examples=2, steps=2)
  return config
''')
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(config_file),
                         "--workdir", str(workdir), "--config.data.data_dir", str(tmp_path / "data"),
                         "--config.compilation_cache_dir", ""],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  model = workdir / "model"
  scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
  assert scheduler["prediction_type"] == "v_prediction"
  for frozen in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
    a, b = tensors(source / frozen), tensors(model / frozen)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  before = tensors(source / "unet" / "diffusion_pytorch_model.safetensors")
  after = tensors(model / "unet" / "diffusion_pytorch_model.safetensors")
  assert before.keys() == after.keys()
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  assert len(changed) > len(before) // 2
  # Fine-tuning moves the weights a little: four AdamW steps at learning rate 2e-3.
  assert all(np.max(np.abs(before[k] - after[k])) < 0.05 for k in before)
  pipe = Pipeline.from_pretrained(str(workdir))
  assert pipe("a small red square at the top", num_inference_steps=2, guidance_scale=1.0).shape == (1, 16, 16, 3)
