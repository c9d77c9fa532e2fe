"""CLIP (Radford et al. 2021): text and image towers, linear projections, learned temperature, and helpers.

Parameter names follow transformers' `CLIPModel` state dict (text_model.*, vision_model.*, text_projection,
visual_projection, logit_scale), so its checkpoints convert with `diffusion_jax.convert.keys.torch_to_flax`.
The loss and evaluation helpers are pure functions on features and logits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffusion_jax.nn.image_encoder import TINY_VISION, VIT_L14, ImageEncoder, VisionConfig
from diffusion_jax.nn.layers import Dense, Dtype
from diffusion_jax.nn.text_encoder import SD15_TEXT, TINY_TEXT, TextEncoder, TextEncoderConfig

# CLIP clamps the learned temperature so that exp(logit_scale) <= 100 (section 2.5 of the paper).
MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Two towers, the shared embedding width and the initial log temperature (transformers' CLIPConfig)."""
  text: TextEncoderConfig = SD15_TEXT
  vision: VisionConfig = VIT_L14
  projection_dim: int = 768
  logit_scale_init_value: float = 2.6592  # log(1 / 0.07)

  @classmethod
  def from_transformers(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    """Reads a transformers CLIPConfig json dict (model_type "clip")."""
    if d.get("model_type", "clip") != "clip":
      raise ValueError(f"not a CLIP config: model_type={d.get('model_type')!r}")
    if d.get("text_config") is None or d.get("vision_config") is None:
      raise ValueError("a CLIP config needs both text_config and vision_config")
    return cls(text=TextEncoderConfig.from_transformers(d["text_config"]),
               vision=VisionConfig.from_transformers(d["vision_config"]),
               projection_dim=int(d.get("projection_dim") or 512),
               logit_scale_init_value=float(d.get("logit_scale_init_value") or 2.6592))

  def to_transformers(self) -> dict[str, Any]:
    """A transformers CLIPConfig json dict (`CLIPConfig(**d)` / `CLIPModel.from_pretrained`)."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": self.text.to_transformers(),
        "vision_config": self.vision.to_transformers(),
        "projection_dim": self.projection_dim,
        "logit_scale_init_value": self.logit_scale_init_value,
        "initializer_factor": 1.0,
    }


# OpenAI CLIP ViT-L/14 (the model whose text tower Stable Diffusion 1.x uses).
CLIP_VIT_L14 = CLIPConfig()
# A small model for 64x64 images in from-scratch CPU runs.
TINY_CLIP = CLIPConfig(text=TINY_TEXT, vision=TINY_VISION, projection_dim=64)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
  """Two-tower CLIP (transformers' CLIPModel).

  `encode_text(ids [B, L])` / `encode_image(images [B, H, W, 3])` -> L2-normalised float32 features [B, P];
  `__call__(ids [T, L], images [I, H, W, 3])` -> (logits_per_image [I, T], logits_per_text [T, I]) with the
  temperature exp(logit_scale) clamped at 100 as in CLIP's training (transformers does not clamp; the two agree
  whenever logit_scale <= log(100), as for every released checkpoint).
  """
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.text_model = TextEncoder(cfg.text, remat=self.remat, **kw)
    self.vision_model = ImageEncoder(cfg.vision, remat=self.remat, **kw)
    self.text_projection = Dense(cfg.projection_dim, use_bias=False, **kw)
    self.visual_projection = Dense(cfg.projection_dim, use_bias=False, **kw)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init_value), ()),
        (), self.param_dtype)

  def encode_text(self, input_ids):  # [B, L] -> [B, P]
    """Projected, L2-normalised text features, taken at the end-of-text token."""
    _, pooled = self.text_model(input_ids)
    return l2_normalize(self.text_projection(pooled))

  def encode_image(self, images):  # [B, H, W, 3] -> [B, P]
    """Projected, L2-normalised image features, taken at the class token."""
    _, pooled = self.vision_model(images)
    return l2_normalize(self.visual_projection(pooled))

  def temperature(self):
    """exp(logit_scale), clamped at 100."""
    return jnp.exp(jnp.minimum(self.logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))

  def __call__(self, input_ids, images):
    text_features = self.encode_text(input_ids)  # [T, P]
    image_features = self.encode_image(images)  # [I, P]
    logits_per_text = self.temperature() * text_features @ image_features.T  # [T, I]
    return logits_per_text.T, logits_per_text


def contrastive_loss(logits_per_text: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over a square batch of matching pairs (transformers' clip_loss).

  Mean of the cross-entropy of each text against all images and of each image against all texts,
  the i-th text matching the i-th image.
  """
  logits = logits_per_text.astype(jnp.float32)  # [N, N]
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
    raise ValueError(f"contrastive_loss needs square logits, got {logits.shape}")
  labels = jnp.arange(logits.shape[0])
  text_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  image_loss = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return (text_loss + image_loss) / 2.0


def zero_shot_classify(image_features: jax.Array, class_text_features: jax.Array, *,
                       temperature: float = 100.0) -> tuple[jax.Array, jax.Array]:
  """Zero-shot classification by cosine similarity to one text embedding per class.

  image_features [N, P], class_text_features [K, P] (e.g. the mean over prompt templates; both are
  re-normalised here) -> (probabilities [N, K] = softmax(temperature * cos), predictions [N] int32).
  """
  logits = temperature * l2_normalize(image_features) @ l2_normalize(class_text_features).T  # [N, K]
  return jax.nn.softmax(logits, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _recall_at_k(similarity: jax.Array, k: int) -> jax.Array:
  """Fraction of rows whose diagonal entry is among the row's k largest (ties counted in its favour)."""
  correct = jnp.diagonal(similarity)[:, None]  # [N, 1]
  rank = jnp.sum(similarity > correct, axis=-1)  # [N]: how many candidates beat the true match
  return jnp.mean((rank < k).astype(jnp.float32))


def retrieval_recall_at_k(text_features: jax.Array, image_features: jax.Array, k: int) -> dict[str, jax.Array]:
  """Recall@k of cross-modal retrieval where text i describes image i.

  text_features [N, P], image_features [N, P] -> {"text_to_image": R@k of finding image i from text i,
  "image_to_text": R@k of finding text i from image i}.
  """
  similarity = l2_normalize(text_features) @ l2_normalize(image_features).T  # [N_text, N_image]
  return {"text_to_image": _recall_at_k(similarity, k), "image_to_text": _recall_at_k(similarity.T, k)}
