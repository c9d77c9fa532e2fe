"""CLIP text transformer: token + position embeddings, pre-LN causal blocks, final LayerNorm, EOS pooling.

Submodule names follow transformers' `CLIPTextModel` state dict without the "text_model." prefix that
checkpoint files carry (`embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`,
`final_layer_norm` ...), so `diffusion_jax.convert.keys.torch_to_flax(..., strip_prefix="text_model.")` loads
Stable Diffusion's `text_encoder/` weights with no per-model table, and `flax_to_torch(params,
prefix="text_model.")` writes files that transformers 4 and 5 both load. The encoder blocks are shared with
the vision tower.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn.attention import multi_head_attention
from diffusion_jax.nn.layers import Dense, Dtype, LayerNorm, gelu

ACTIVATIONS = ("quick_gelu", "gelu")


def activation(name: str):
  """The MLP activation of a CLIP block: "quick_gelu" (OpenAI CLIP) or exact "gelu" (OpenCLIP)."""
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return gelu
  raise ValueError(f"unsupported hidden_act {name!r}; expected one of {ACTIVATIONS}")


def check_reference_options(d: Mapping[str, Any], what: str) -> None:
  """Raises ValueError for reference options that would change the network but are not implemented.

  Keys that only matter for initialisation or bookkeeping (initializer_range, architectures, dtype ...) are
  ignored; dropout is a training-time option that these modules do not implement.
  """
  for key in ("attention_dropout", "dropout"):
    if d.get(key):
      raise ValueError(f"{what}: {key}={d[key]} is not supported (only 0.0)")
  if d.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
    raise ValueError(f"{what}: unsupported hidden_act {d['hidden_act']!r}; expected one of {ACTIVATIONS}")


def _require_int_token(name: str, value: Any) -> int:
  if isinstance(value, (list, tuple)):
    raise ValueError(f"{name} must be a single token id, got {value!r}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Shape of a CLIP text transformer (transformers' CLIPTextConfig under shorter names)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
  layer_norm_eps: float = 1e-5
  # eos_token_id == 2 marks legacy configs whose pooling takes the argmax of the ids (the EOS has the largest id).
  eos_token_id: int = 2
  pad_token_id: int = 1
  bos_token_id: int = 0
  projection_dim: int = 768  # width of text_projection in the with-projection variant

  def __post_init__(self):
    activation(self.hidden_act)  # validates the name
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

  @classmethod
  def from_transformers(cls, d: Mapping[str, Any]) -> "TextEncoderConfig":
    """Reads a transformers CLIPTextConfig json dict (or a CLIPConfig dict, whose text_config is taken)."""
    if d.get("model_type") == "clip" or "text_config" in d:
      d = d["text_config"]
    if d.get("model_type", "clip_text_model") != "clip_text_model":
      raise ValueError(f"not a CLIP text config: model_type={d.get('model_type')!r}")
    names = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
             "max_position_embeddings": "max_position_embeddings", "hidden_act": "hidden_act",
             "layer_norm_eps": "layer_norm_eps", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
             "bos_token_id": "bos_token_id", "projection_dim": "projection_dim"}
    check_reference_options(d, "CLIPTextConfig")
    defaults = _TRANSFORMERS_TEXT_DEFAULTS
    # A key present with value None means "the reference default" in transformers' configs.
    kw = {ours: defaults[theirs] if d.get(theirs) is None else d[theirs] for theirs, ours in names.items()}
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
      kw[key] = _require_int_token(key, kw[key])
    return cls(**kw)

  def to_transformers(self) -> dict[str, Any]:
    """A transformers CLIPTextConfig json dict (`CLIPTextConfig(**d)` / `CLIPTextModel.from_pretrained`)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "projection_dim": self.projection_dim,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": self.hidden_act,
        "layer_norm_eps": self.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": self.pad_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
    }


# transformers' CLIPTextConfig defaults, used for keys a config.json leaves out.
_TRANSFORMERS_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
}

# Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 text tower (123,060,480 parameters), legacy EOS convention.
SD15_TEXT = TextEncoderConfig()
# Stable Diffusion 2.x: OpenCLIP ViT-H/14 text tower with its last block dropped (23 of 24), exact GELU.
SD21_TEXT = TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16,
                              hidden_act="gelu", projection_dim=512)
# A small tower for from-scratch CPU runs; replace vocab_size and the token ids to fit a smaller tokenizer.
TINY_TEXT = TextEncoderConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=2, projection_dim=64,
                              eos_token_id=49407, pad_token_id=49407, bos_token_id=49406)


class SelfAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections (CLIPAttention)."""
  num_heads: int
  is_causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    q = Dense(width, name="q_proj", **kw)(x)
    k = Dense(width, name="k_proj", **kw)(x)
    v = Dense(width, name="v_proj", **kw)(x)
    out = multi_head_attention(q, k, v, self.num_heads, is_causal=self.is_causal)  # [B, T, D]
    return Dense(width, name="out_proj", **kw)(out)


class MLP(nn.Module):
  """fc1 -> activation -> fc2 (CLIPMLP)."""
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.intermediate_size, name="fc1", **kw)(x)
    return Dense(x.shape[-1], name="fc2", **kw)(activation(self.hidden_act)(h))


class EncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)) (CLIPEncoderLayer)."""
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  is_causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + SelfAttention(self.num_heads, self.is_causal, name="self_attn", **kw)(h)
    h = LayerNorm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
    return x + MLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)


class Encoder(nn.Module):
  """A stack of `EncoderLayer`s named layers_0 ... layers_{N-1}; returns the output and every layer's input."""
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  is_causal: bool = False
  remat: bool = False  # recompute each block in the backward pass to save activation memory
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> ([B, T, D], (num_layers + 1) x [B, T, D])
    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    hidden_states = [x]
    for i in range(self.num_layers):
      x = layer_cls(self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, self.is_causal,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(x)
      hidden_states.append(x)
    return x, tuple(hidden_states)


def embedding_init(stddev: float, axes: tuple[str, ...]):
  """Normal(0, stddev) initialiser carrying logical axis names (CLIP's embedding init)."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


class TextEmbeddings(nn.Module):
  """Token embedding plus learned absolute position embedding (CLIPTextEmbeddings)."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):  # [B, L] int -> [B, L, D]
    length = input_ids.shape[-1]
    if length > self.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings {self.max_position_embeddings}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=embedding_init(0.02, ("vocab", "embed")),
                      name="token_embedding", **kw)(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size,
                         embedding_init=embedding_init(0.02, ("pos", "embed")),
                         name="position_embedding", **kw)(jnp.arange(length))
    return tokens + positions[None]  # [B, L, D]


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the end-of-text token in each row, exactly as transformers' CLIPTextModel picks it.

  Legacy configs (eos_token_id == 2, e.g. Stable Diffusion 1.x/2.x) take the position of the largest id,
  which is the EOS in CLIP's BPE vocabulary; newer configs take the first position equal to eos_token_id.
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextEncoder(nn.Module):
  """CLIP text transformer (transformers' CLIPTextModel).

  `__call__(input_ids [B, L] int32)` -> (last_hidden_state [B, L, D], pooled [B, D]); with
  `output_hidden_states=True` a third entry holds num_layers + 1 states [B, L, D] (the embeddings first,
  then each block's output before the final LayerNorm), as transformers' `hidden_states`.
  """
  config: TextEncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, output_hidden_states: bool = False):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = TextEmbeddings(cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings, name="embeddings",
                       **kw)(input_ids)
    x, hidden_states = Encoder(cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.hidden_act,
                               cfg.layer_norm_eps, is_causal=True, remat=self.remat, name="encoder", **kw)(x)
    last_hidden_state = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)  # [B, L, D]
    eos = eos_positions(input_ids, cfg.eos_token_id)  # [B]
    pooled = jnp.take_along_axis(last_hidden_state, eos[:, None, None], axis=1)[:, 0]  # [B, D]
    if output_hidden_states:
      return last_hidden_state, pooled, hidden_states
    return last_hidden_state, pooled


class TextEncoderWithProjection(nn.Module):
  """Text tower plus a bias-free projection of the pooled output (transformers' CLIPTextModelWithProjection).

  Parameters: text_model/... and text_projection/kernel. Returns (last_hidden_state [B, L, D],
  text_embeds [B, P]) and, with `output_hidden_states=True`, the hidden states as a third entry.
  The embeddings are not normalised (as in transformers).
  """
  config: TextEncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, output_hidden_states: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    last, pooled, hidden_states = TextEncoder(self.config, remat=self.remat, name="text_model", **kw)(
        input_ids, output_hidden_states=True)
    text_embeds = Dense(self.config.projection_dim, use_bias=False, name="text_projection", **kw)(pooled)
    if output_hidden_states:
      return last, text_embeds, hidden_states
    return last, text_embeds
