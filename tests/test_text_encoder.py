"""CLIP text tower against transformers' CLIPTextModel on random weights, configs, parameter counts."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from diffusion_jax.convert.keys import flax_to_torch, torch_to_flax
from diffusion_jax.nn.text_encoder import (SD15_TEXT, SD21_TEXT, TINY_TEXT, TextEncoder, TextEncoderConfig,
                                           TextEncoderWithProjection)

VOCAB = 64
LENGTH = 12  # shorter than max_position_embeddings: only the first LENGTH positions are used


def small_config(hidden_act: str, eos_token_id: int) -> TextEncoderConfig:
  return TextEncoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                           max_position_embeddings=16, hidden_act=hidden_act, layer_norm_eps=1e-5,
                           eos_token_id=eos_token_id, pad_token_id=1, bos_token_id=0, projection_dim=24)


def randomize_(model: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
  """Every parameter random (norm scales around 1), so that each one influences the output."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name or "layernorm" in name or "layrnorm" in name:
        p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
      else:
        p.copy_(0.15 * noise)
  return {k: v.numpy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def token_ids(eos_token_id: int, rng: np.random.Generator) -> np.ndarray:
  """Rows of BOS, words, EOS at varying positions, then padding; no word equals the EOS id."""
  words = np.setdiff1d(np.arange(3, VOCAB - 1), [eos_token_id])
  ids = np.full((4, LENGTH), 1, np.int32)
  for row, eos_at in enumerate([3, 7, LENGTH - 1, 5]):
    ids[row, 0] = 0
    ids[row, 1:eos_at] = rng.choice(words, eos_at - 1)
    ids[row, eos_at] = eos_token_id
  if eos_token_id == 2:
    # Legacy convention: pooling takes the largest id, which the EOS is in CLIP's vocabulary.
    ids[ids == 2] = VOCAB - 1
    ids[1, 8:] = VOCAB - 1  # padded with EOS, as SD 1.x's tokenizer does: the first one is pooled
  else:
    ids[3, 9] = eos_token_id  # a second EOS later: the first one is pooled
    ids[2, 2] = VOCAB - 1  # a larger id elsewhere must not be pooled
  return ids


def reference_and_params(cfg: TextEncoderConfig, module, reference_cls, strip_prefix="text_model.", seed=0):
  reference = reference_cls(transformers.CLIPTextConfig(**cfg.to_transformers())).eval()
  sd = randomize_(reference, seed)
  ids = jnp.zeros((1, LENGTH), jnp.int32)
  target = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), ids))["params"]
  params = torch_to_flax(sd.keys(), sd.__getitem__, target, strip_prefix=strip_prefix)
  return reference, params


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, 9])
def test_matches_transformers_clip_text_model(hidden_act, eos_token_id):
  cfg = small_config(hidden_act, eos_token_id)
  model = TextEncoder(cfg)
  reference, params = reference_and_params(cfg, model, transformers.CLIPTextModel)
  ids = token_ids(eos_token_id, np.random.default_rng(0))
  with torch.no_grad():
    want = reference(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
  last, pooled, hidden = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(params, ids)

  assert last.shape == (4, LENGTH, 32) and pooled.shape == (4, 32)
  assert rel_err(last, want.last_hidden_state) <= 1e-5
  assert rel_err(pooled, want.pooler_output) <= 1e-5
  assert len(hidden) == len(want.hidden_states) == cfg.num_layers + 1
  for ours, theirs in zip(hidden, want.hidden_states):
    assert rel_err(ours, theirs) <= 1e-5
  # The pooled vector is the EOS row of the last hidden state, not a different reduction.
  eos_at = np.array([3, 7, LENGTH - 1, 5])
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(last)[np.arange(4), eos_at])

  # bf16 compute with float32 parameters stays close to the float32 reference.
  last16, pooled16 = jax.jit(TextEncoder(cfg, dtype=jnp.bfloat16).apply)({"params": params}, ids)
  assert last16.dtype == jnp.bfloat16
  assert rel_err(last16.astype(jnp.float32), want.last_hidden_state) <= 2e-2
  assert rel_err(pooled16.astype(jnp.float32), want.pooler_output) <= 2e-2


def test_matches_transformers_text_model_with_projection():
  cfg = small_config("gelu", 2)
  model = TextEncoderWithProjection(cfg)
  reference, params = reference_and_params(cfg, model, transformers.CLIPTextModelWithProjection, strip_prefix="",
                                           seed=1)
  ids = token_ids(2, np.random.default_rng(1))
  with torch.no_grad():
    want = reference(input_ids=torch.from_numpy(ids).long())
  last, text_embeds = jax.jit(model.apply)({"params": params}, ids)
  assert text_embeds.shape == (4, cfg.projection_dim)
  assert rel_err(last, want.last_hidden_state) <= 1e-5
  assert rel_err(text_embeds, want.text_embeds) <= 1e-5


def test_parameter_names_round_trip_to_the_reference_state_dict():
  cfg = small_config("quick_gelu", 2)
  model = TextEncoder(cfg, remat=True)  # rematerialisation must not change the parameter tree
  reference, params = reference_and_params(cfg, model, transformers.CLIPTextModel)
  # Checkpoints on disk (Stable Diffusion's text_encoder/, transformers 4) carry the "text_model." prefix;
  # transformers 5 holds the tower without it in memory and loads either.
  exported = flax_to_torch(params, prefix="text_model.")
  sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in reference.state_dict().items()}
  assert set(exported) == {k for k in sd if not k.endswith("position_ids")}
  for key, value in exported.items():
    np.testing.assert_array_equal(value, sd[key].numpy())


@pytest.mark.parametrize("cfg", [SD15_TEXT, SD21_TEXT, TINY_TEXT, small_config("gelu", 9)])
def test_config_round_trip_through_transformers(cfg):
  reference_config = transformers.CLIPTextConfig(**cfg.to_transformers())
  assert reference_config.num_hidden_layers == cfg.num_layers
  assert reference_config.hidden_act == cfg.hidden_act
  assert TextEncoderConfig.from_transformers(reference_config.to_dict()) == cfg
  # A full CLIPConfig dict yields its text tower.
  clip_config = transformers.CLIPConfig(text_config=cfg.to_transformers())
  assert TextEncoderConfig.from_transformers(clip_config.to_dict()) == cfg


def test_reads_stable_diffusion_2_text_encoder_config():
  # stabilityai/stable-diffusion-2-1 text_encoder/config.json
  sd21 = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
          "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
          "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
          "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 16,
          "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512, "torch_dtype": "float32",
          "transformers_version": "4.25.0.dev0", "vocab_size": 49408}
  assert TextEncoderConfig.from_transformers(sd21) == SD21_TEXT


@pytest.mark.parametrize("change", [{"hidden_act": "relu"}, {"attention_dropout": 0.1}, {"eos_token_id": [2, 3]},
                                    {"model_type": "t5"}])
def test_unsupported_reference_options_raise(change):
  with pytest.raises(ValueError):
    TextEncoderConfig.from_transformers({**SD15_TEXT.to_transformers(), **change})


def count_params(module, *args) -> int:
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))


@pytest.mark.parametrize("cfg", [SD15_TEXT, SD21_TEXT])
def test_full_size_parameter_counts_match_reference(cfg):
  with torch.device("meta"):
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers()))
  want = sum(p.numel() for p in reference.parameters())
  ours = count_params(TextEncoder(cfg), jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))
  assert ours == want
  if cfg == SD15_TEXT:
    assert ours == 123_060_480


def test_config_rejects_inconsistent_shapes():
  with pytest.raises(ValueError):
    dataclasses.replace(TINY_TEXT, num_heads=3)
  with pytest.raises(ValueError):
    TextEncoder(TINY_TEXT).init(jax.random.key(0), jnp.zeros((1, 78), jnp.int32))
