"""CLIP vision tower and two-tower model against transformers on random weights; loss and evaluation helpers."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip import modeling_clip

from diffusion_jax.convert.keys import flax_to_torch, torch_to_flax
from diffusion_jax.nn.clip import (CLIP, CLIP_VIT_L14, TINY_CLIP, CLIPConfig, contrastive_loss,
                                   retrieval_recall_at_k, zero_shot_classify)
from diffusion_jax.nn.image_encoder import (TINY_VISION, VIT_B32, VIT_L14, ImageEncoder, VisionConfig,
                                            preprocess)
from diffusion_jax.nn.text_encoder import TextEncoderConfig

SMALL_VISION = VisionConfig(image_size=24, patch_size=6, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, hidden_act="gelu", projection_dim=20)
SMALL_TEXT = TextEncoderConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=2,
                               max_position_embeddings=10, eos_token_id=2, projection_dim=20)
SMALL_CLIP = CLIPConfig(text=SMALL_TEXT, vision=SMALL_VISION, projection_dim=16)


def randomize_(model: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
  """Every parameter random (norm scales around 1), so that each one influences the output."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        continue
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name or "layernorm" in name or "layrnorm" in name:
        p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
      else:
        p.copy_(0.15 * noise)
  return {k: v.numpy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def convert(module, sd, *args):
  target = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
  return torch_to_flax(sd.keys(), sd.__getitem__, target, strip_prefix="vision_model."
                       if isinstance(module, ImageEncoder) else "")


def images_nhwc(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_image_encoder_matches_transformers_clip_vision_model():
  cfg = SMALL_VISION
  reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg.to_transformers())).eval()
  sd = randomize_(reference)
  model = ImageEncoder(cfg)
  images = images_nhwc(3, cfg.image_size)
  params = convert(model, sd, images)
  with torch.no_grad():
    want = reference(pixel_values=to_nchw(images), output_hidden_states=True)
  last, pooled, hidden = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(params,
                                                                                                       images)
  assert last.shape == (3, cfg.num_positions, cfg.hidden_size) and pooled.shape == (3, cfg.hidden_size)
  assert rel_err(last, want.last_hidden_state) <= 1e-5
  assert rel_err(pooled, want.pooler_output) <= 1e-5
  assert len(hidden) == len(want.hidden_states) == cfg.num_layers + 1
  for ours, theirs in zip(hidden, want.hidden_states):
    assert rel_err(ours, theirs) <= 1e-5

  last16, pooled16 = jax.jit(ImageEncoder(cfg, dtype=jnp.bfloat16).apply)({"params": params}, images)
  assert pooled16.dtype == jnp.bfloat16
  assert rel_err(last16.astype(jnp.float32), want.last_hidden_state) <= 2e-2
  assert rel_err(pooled16.astype(jnp.float32), want.pooler_output) <= 2e-2

  exported = flax_to_torch(params, prefix="vision_model.")
  assert set(exported) == {"vision_model." + k.removeprefix("vision_model.") for k in sd
                           if not k.endswith("position_ids")}


def clip_reference(cfg: CLIPConfig, logit_scale: float, seed: int = 0):
  reference = transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_transformers())).eval()
  sd = randomize_(reference, seed)
  with torch.no_grad():
    reference.logit_scale.fill_(logit_scale)
  sd["logit_scale"] = np.float32(logit_scale)
  return reference, sd


def clip_inputs(cfg: CLIPConfig, n: int = 4):
  rng = np.random.default_rng(1)
  ids = rng.integers(3, cfg.text.vocab_size - 1, size=(n, 8)).astype(np.int32)
  ids[:, 0] = 0
  for row, eos_at in enumerate(range(2, 2 + n)):
    ids[row, eos_at:] = cfg.text.vocab_size - 1  # EOS then EOS padding (legacy argmax pooling)
  return ids, images_nhwc(n, cfg.vision.image_size, seed=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_clip_matches_transformers_clip_model(dtype):
  cfg = SMALL_CLIP
  reference, sd = clip_reference(cfg, logit_scale=2.1)
  ids, images = clip_inputs(cfg)
  model = CLIP(cfg, dtype=dtype)
  params = convert(CLIP(cfg), sd, ids, images)
  with torch.no_grad():
    want = reference(input_ids=torch.from_numpy(ids).long(), pixel_values=to_nchw(images), return_loss=True)
  logits_per_image, logits_per_text = jax.jit(model.apply)({"params": params}, ids, images)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert logits_per_image.shape == (4, 4)
  assert rel_err(logits_per_image, want.logits_per_image) <= tol
  assert rel_err(logits_per_text, want.logits_per_text) <= tol
  assert rel_err(contrastive_loss(logits_per_text), want.loss) <= tol

  text_features = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_text))(params, ids)
  image_features = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))(params, images)
  assert rel_err(text_features, want.text_embeds) <= tol
  assert rel_err(image_features, want.image_embeds) <= tol
  np.testing.assert_allclose(np.linalg.norm(text_features, axis=-1), 1.0, rtol=1e-5)


def test_temperature_is_clamped_at_100():
  cfg = SMALL_CLIP
  reference, sd = clip_reference(cfg, logit_scale=5.0, seed=3)  # exp(5) = 148 > 100
  ids, images = clip_inputs(cfg)
  params = convert(CLIP(cfg), sd, ids, images)
  with torch.no_grad():
    want = reference(input_ids=torch.from_numpy(ids).long(), pixel_values=to_nchw(images))
  _, logits_per_text = jax.jit(CLIP(cfg).apply)({"params": params}, ids, images)
  assert rel_err(logits_per_text, want.logits_per_text.numpy() * 100.0 / math.exp(5.0)) <= 1e-5


def test_clip_parameter_names_are_the_reference_state_dict():
  cfg = SMALL_CLIP
  reference, sd = clip_reference(cfg, logit_scale=2.6592)
  ids, images = clip_inputs(cfg)
  params = convert(CLIP(cfg), sd, ids, images)
  exported = flax_to_torch(params)
  assert set(exported) == {k for k in sd if not k.endswith("position_ids")}
  for key, value in exported.items():
    np.testing.assert_array_equal(value, sd[key])
  # The temperature starts at 1/0.07: logit_scale = log(1/0.07).
  variables = nn.meta.unbox(CLIP(cfg).init(jax.random.key(0), method=CLIP.temperature))
  assert float(variables["params"]["logit_scale"]) == pytest.approx(cfg.logit_scale_init_value)
  assert float(CLIP(cfg).apply(variables, method=CLIP.temperature)) == pytest.approx(1 / 0.07, rel=1e-4)


@pytest.mark.parametrize("cfg", [VIT_L14, VIT_B32, TINY_VISION, SMALL_VISION])
def test_vision_config_round_trip_through_transformers(cfg):
  reference_config = transformers.CLIPVisionConfig(**cfg.to_transformers())
  assert VisionConfig.from_transformers(reference_config.to_dict()) == cfg


@pytest.mark.parametrize("cfg", [CLIP_VIT_L14, TINY_CLIP, SMALL_CLIP])
def test_clip_config_round_trip_through_transformers(cfg):
  reference_config = transformers.CLIPConfig(**cfg.to_transformers())
  assert reference_config.projection_dim == cfg.projection_dim
  assert CLIPConfig.from_transformers(reference_config.to_dict()) == cfg


@pytest.mark.parametrize("change", [{"image_size": [224, 192]}, {"hidden_act": "silu"}, {"attention_dropout": 0.1},
                                    {"patch_size": 15}])
def test_unsupported_vision_options_raise(change):
  with pytest.raises(ValueError):
    VisionConfig.from_transformers({**VIT_L14.to_transformers(), **change})


def test_full_size_clip_vit_l14_parameter_count_matches_reference():
  cfg = CLIP_VIT_L14
  with torch.device("meta"):
    reference = transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_transformers()))
  want = sum(p.numel() for p in reference.parameters())
  ids = jnp.zeros((1, 77), jnp.int32)
  images = jnp.zeros((1, 224, 224, 3), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(CLIP(cfg).init, jax.random.key(0), ids, images))["params"]
  assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == want
  vision = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["vision_model"]))
  assert vision == sum(p.numel() for p in reference.vision_model.parameters())


def test_preprocess_matches_clip_image_processor():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(50, 70, 3), (81, 40, 3), (32, 32, 3)]]
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  for image in images:
    want = processor(images=image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    ours = preprocess(image, 32)
    assert ours.shape == (1, 32, 32, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, want, atol=1e-5)
  batch = np.stack([images[2], images[2][::-1]])
  assert preprocess(batch, 32).shape == (2, 32, 32, 3)


def test_contrastive_loss_equals_transformers_clip_loss():
  logits = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32) * 5
  clip_loss = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
  want = float(clip_loss(torch.from_numpy(logits)))
  assert float(contrastive_loss(jnp.asarray(logits))) == pytest.approx(want, rel=1e-6)
  # Perfectly separated pairs give (almost) zero loss, uniform logits give log(N).
  assert float(contrastive_loss(100.0 * jnp.eye(6))) < 1e-6
  assert float(contrastive_loss(jnp.zeros((6, 6)))) == pytest.approx(math.log(6), rel=1e-6)


def test_zero_shot_classify_picks_the_known_class():
  rng = np.random.default_rng(0)
  class_features = np.linalg.qr(rng.normal(size=(16, 5)))[0].T  # 5 orthonormal class embeddings [5, 16]
  labels = rng.integers(0, 5, size=20)
  # Images near their class embedding, at arbitrary scale (features are re-normalised).
  image_features = (class_features[labels] + 0.3 * rng.normal(size=(20, 16)) / 4) * rng.uniform(0.5, 3, (20, 1))
  probs, predictions = zero_shot_classify(jnp.asarray(image_features), jnp.asarray(class_features))
  np.testing.assert_array_equal(np.asarray(predictions), labels)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
  unit = image_features / np.linalg.norm(image_features, axis=-1, keepdims=True)
  logits = 100.0 * unit @ class_features.T
  want = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(probs), want / want.sum(-1, keepdims=True), atol=1e-5)


def test_retrieval_recall_at_k_matches_brute_force():
  rng = np.random.default_rng(0)
  text = rng.normal(size=(12, 8)).astype(np.float32)
  image = (text + 1.2 * rng.normal(size=(12, 8))).astype(np.float32)  # noisy matches: some are missed
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  similarity = unit(text) @ unit(image).T
  for k in (1, 3, 5):
    recall = retrieval_recall_at_k(jnp.asarray(text), jnp.asarray(image), k)
    top_images = np.argsort(-similarity, axis=1)[:, :k]
    top_texts = np.argsort(-similarity.T, axis=1)[:, :k]
    want_t2i = np.mean([i in top_images[i] for i in range(12)])
    want_i2t = np.mean([i in top_texts[i] for i in range(12)])
    assert float(recall["text_to_image"]) == pytest.approx(want_t2i)
    assert float(recall["image_to_text"]) == pytest.approx(want_i2t)
  # Identical features retrieve perfectly; a shifted pairing never at rank 1.
  assert float(retrieval_recall_at_k(jnp.asarray(text), jnp.asarray(text), 1)["text_to_image"]) == 1.0
  shifted = retrieval_recall_at_k(jnp.asarray(text), jnp.asarray(np.roll(text, 1, axis=0)), 1)
  assert float(shifted["text_to_image"]) == 0.0 and float(shifted["image_to_text"]) == 0.0
