"""Tiny random Stable Diffusion pipelines in diffusers format, built with the PyTorch references."""
from __future__ import annotations

import os

import torch

WORDS = ("a photo of cat dog red blue green circle square on the left right small large painting "
         "astronaut riding horse").split()


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
  """Moves every parameter (norm scales and biases too) away from its init so that all of them matter."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))


def build_sd_directory(path: str, *, style: str = "sd1", scheduler: str = "ddim") -> str:
  """Saves a tiny random StableDiffusionPipeline (SD 1-style eps or SD 2-style v) with `save_pretrained`."""
  import diffusers
  import transformers

  from diffusion_jax.tokenizer import CLIPTokenizer

  os.makedirs(path, exist_ok=True)
  pad = "<|endoftext|>" if style == "sd1" else "!"
  CLIPTokenizer.from_words(WORDS, pad_token=pad).save_pretrained(os.path.join(path, "tokenizer_src"))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer_src"))
  torch.manual_seed(0)
  text_config = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, hidden_act="quick_gelu" if style == "sd1" else "gelu",
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  text_encoder = transformers.CLIPTextModel(text_config).eval()
  unet_kw = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
  if style == "sd1":
    unet_kw.update(attention_head_dim=8)
  else:
    unet_kw.update(attention_head_dim=(2, 4), use_linear_projection=True)
  unet = diffusers.UNet2DConditionModel(**unet_kw).eval()
  vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()
  for i, m in enumerate((text_encoder, unet, vae)):
    perturb_(m, seed=i + 1)
  sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, prediction_type="epsilon" if style == "sd1" else "v_prediction",
                  timestep_spacing="leading")
  sched_cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
               "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[scheduler]
  sched = sched_cls(**sched_kw, **({"clip_sample": False, "set_alpha_to_one": False} if scheduler == "ddim" else {}))
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
  pipe.save_pretrained(path)
  return path
