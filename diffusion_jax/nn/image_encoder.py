"""CLIP vision transformer (ViT): patch embedding, class token, pre-LN blocks, pooled class token.

Submodule names follow transformers' `CLIPVisionModel` state dict with the "vision_model." prefix removed
(`embeddings.patch_embedding`, `embeddings.class_embedding`, `pre_layrnorm` (sic), `encoder.layers.N`,
`post_layernorm`). Images are NHWC floats already normalised with CLIP's mean and std (see `preprocess`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.nn.layers import Conv, Dtype, LayerNorm
from diffusion_jax.nn.text_encoder import Encoder, activation, check_reference_options, embedding_init

# OpenAI CLIP's image normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _square(name: str, value: Any) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) == 2 and value[0] != value[1]:
      raise ValueError(f"only square {name} is supported, got {value!r}")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Shape of a CLIP vision transformer (transformers' CLIPVisionConfig under shorter names)."""
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768  # width of visual_projection in the with-projection variant

  def __post_init__(self):
    activation(self.hidden_act)  # validates the name
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1  # patches + class token

  @classmethod
  def from_transformers(cls, d: Mapping[str, Any]) -> "VisionConfig":
    """Reads a transformers CLIPVisionConfig json dict (or a CLIPConfig dict, whose vision_config is taken)."""
    if d.get("model_type") == "clip" or "vision_config" in d:
      d = d["vision_config"]
    if d.get("model_type", "clip_vision_model") != "clip_vision_model":
      raise ValueError(f"not a CLIP vision config: model_type={d.get('model_type')!r}")
    check_reference_options(d, "CLIPVisionConfig")
    names = {"image_size": "image_size", "patch_size": "patch_size", "num_channels": "num_channels",
             "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "hidden_act": "hidden_act",
             "layer_norm_eps": "layer_norm_eps", "projection_dim": "projection_dim"}
    defaults = _TRANSFORMERS_VISION_DEFAULTS
    kw = {ours: defaults[theirs] if d.get(theirs) is None else d[theirs] for theirs, ours in names.items()}
    kw["image_size"] = _square("image_size", kw["image_size"])
    kw["patch_size"] = _square("patch_size", kw["patch_size"])
    return cls(**kw)

  def to_transformers(self) -> dict[str, Any]:
    """A transformers CLIPVisionConfig json dict (`CLIPVisionConfig(**d)` / `CLIPVisionModel.from_pretrained`)."""
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "image_size": self.image_size,
        "patch_size": self.patch_size,
        "num_channels": self.num_channels,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "projection_dim": self.projection_dim,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "hidden_act": self.hidden_act,
        "layer_norm_eps": self.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }


# transformers' CLIPVisionConfig defaults, used for keys a config.json leaves out.
_TRANSFORMERS_VISION_DEFAULTS = {
    "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}

# OpenAI CLIP ViT-L/14 at 224 px (the image tower paired with SD 1.x's text encoder).
VIT_L14 = VisionConfig()
# OpenAI CLIP ViT-B/32.
VIT_B32 = VisionConfig(patch_size=32, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                       projection_dim=512)
# A small tower for 64x64 images in from-scratch CPU runs.
TINY_VISION = VisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_layers=2,
                           num_heads=2, projection_dim=64)


class VisionEmbeddings(nn.Module):
  """Non-overlapping patch conv (no bias), a learned class token in front, learned positions (CLIPVisionEmbeddings)."""
  image_size: int
  patch_size: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):  # [B, H, W, C] -> [B, 1 + (H/p)(W/p), D]
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"input image size {h}x{w} does not match the model's {self.image_size}x{self.image_size}")
    patches = Conv(self.hidden_size, self.patch_size, stride=self.patch_size, padding="VALID", use_bias=False,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(images)
    # [B, H/p, W/p, D] -> [B, N, D], row-major over the grid as torch's flatten(2).transpose(1, 2).
    patches = patches.reshape(b, -1, self.hidden_size)
    class_embedding = self.param("class_embedding", embedding_init(self.hidden_size ** -0.5, ("embed",)),
                                 (self.hidden_size,), self.param_dtype)
    class_token = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, self.hidden_size))
    x = jnp.concatenate([class_token, patches], axis=1)  # [B, N + 1, D]
    num_positions = x.shape[1]
    positions = nn.Embed(num_positions, self.hidden_size, embedding_init=embedding_init(0.02, ("pos", "embed")),
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         name="position_embedding")(jnp.arange(num_positions))
    return x + positions[None]


class ImageEncoder(nn.Module):
  """CLIP vision transformer (transformers' CLIPVisionModel).

  `__call__(images [B, H, W, C])` -> (last_hidden_state [B, N + 1, D], pooled [B, D]) where pooled is the
  class token after post_layernorm; with `output_hidden_states=True` a third entry holds num_layers + 1
  states (the pre-LayerNormed embeddings first), as transformers' `hidden_states`.
  """
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, output_hidden_states: bool = False):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = VisionEmbeddings(cfg.image_size, cfg.patch_size, cfg.hidden_size, name="embeddings", **kw)(images)
    x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
    x, hidden_states = Encoder(cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.hidden_act,
                               cfg.layer_norm_eps, is_causal=False, remat=self.remat, name="encoder", **kw)(x)
    pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])  # [B, D]
    if output_hidden_states:
      return x, pooled, hidden_states
    return x, pooled


def preprocess(images_uint8, size: int = 224) -> np.ndarray:
  """CLIP's image preprocessing on the host: uint8 [B, H, W, 3] -> float32 [B, size, size, 3].

  As transformers' CLIPImageProcessor: bicubic resize of the shorter side to `size` (PIL), centre crop,
  scale to [0, 1], normalise with CLIP's mean and std. Also accepts one image [H, W, 3] or a list of
  images of different sizes.
  """
  from PIL import Image  # host-side only

  if isinstance(images_uint8, np.ndarray) and images_uint8.ndim == 3:
    images_uint8 = images_uint8[None]
  out = []
  for image in images_uint8:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"preprocess expects uint8 images, got {image.dtype}")
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    pil = Image.fromarray(image[..., :3]).resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    resized = np.asarray(pil)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
    out.append((crop - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32))
  return np.stack(out)
