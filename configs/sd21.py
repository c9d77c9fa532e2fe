"""Fine-tunes the UNet of Stable Diffusion 2.1 (768 px, v-prediction) on your own captioned images.

Launch exactly as configs/sd15.py describes (one host, or every host of a TPU pod slice), with
`--config configs/sd21.py` and `--config.diffusion.init_from` pointing at a diffusers-format
stable-diffusion-2-1 directory. The prediction type (v_prediction) and the noise schedule come from
the directory's scheduler; at 768 px the activations are 2.25x larger than SD 1.5's at 512 px, hence
the smaller per-step batch with gradient accumulation.
"""
from configs import sd15


def get_config():
  config = sd15.get_config()
  config.data.image_size = 768
  config.mesh.update(data=-1, fsdp=8)
  d = config.diffusion
  d.update(batch_size=256, microbatches=2, learning_rate=5e-6)
  d.prediction_type = ""  # keep the directory's (v_prediction for SD 2.x)
  d.min_snr_gamma = 5.0  # weights the v loss by min(SNR, 5) / (SNR + 1)
  return config
