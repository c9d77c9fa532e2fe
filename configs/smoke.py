"""A seconds-long run of every stage on a small `shapes` build: for tests and CI, not for quality.

Each stage runs a few dozen steps with a checkpoint every few steps, on 32x32 images (16x16x4
latents) with tiny networks, so the whole run (compilation included) stays under two minutes.

  python train.py --config configs/smoke.py --workdir /tmp/smoke
"""
from configs import default


def get_config():
  config = default.get_config()
  config.keep_checkpoints = 2
  config.data.image_size = 32
  config.data.train_size = 512
  config.data.test_size = 64

  ae = config.autoencoder
  ae.update(steps=24, batch_size=8, learning_rate=3e-3, warmup_steps=4, log_every=4, checkpoint_every=8)
  ae.model.block_out_channels = (8, 16)  # 32x32 images <-> 16x16x4 latents
  ae.model.norm_num_groups = 8
  ae.model.mid_block_add_attention = False
  ae.crop_size = 16
  ae.eval_examples = 16
  ae.eval_batch_size = 16

  cl = config.clip
  cl.update(steps=24, batch_size=16, learning_rate=2e-3, warmup_steps=4, log_every=4, checkpoint_every=8)
  cl.model.text.update(hidden_size=32, intermediate_size=128, num_layers=1, num_heads=2)
  cl.model.vision.update(hidden_size=32, intermediate_size=128, num_layers=1, num_heads=2, patch_size=8)
  cl.model.projection_dim = 32
  cl.eval_examples = 32
  cl.eval_batch_size = 32

  d = config.diffusion
  d.update(steps=30, batch_size=8, learning_rate=2e-3, warmup_steps=4, log_every=5, checkpoint_every=10,
           ema_decay=0.9)
  d.cache_examples = 256
  d.encode_batch_size = 64
  d.scaling_examples = 32
  d.unet.block_out_channels = (16,)
  d.unet.down_block_types = ("CrossAttnDownBlock2D",)
  d.unet.up_block_types = ("CrossAttnUpBlock2D",)
  d.unet.attention_head_dim = 2
  d.unet.norm_num_groups = 8
  d.sample.steps = 5
  d.sample.eval_examples = 8
  d.sample.grid_examples = 8
  return config
