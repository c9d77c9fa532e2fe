"""Stage "clip": a two-tower CLIP trained with the symmetric InfoNCE loss and a learned temperature.

The temperature starts at 1/0.07 and is clamped at 100 (inside `CLIP`). Pairs whose captions
repeat within a batch are not counted as negatives (`mask_duplicate_pairs`), and on `shapes` the
stage can train on single-object examples only (`max_objects`): with one object per caption the
contrast rewards shape as soon as colour is learned, which two-object captions dilute. Micro-batching
(`microbatches` > 1) contrasts each micro-batch on its own, so it changes the loss (fewer
negatives per example) rather than only splitting its computation.

Evaluation on the `shapes` test split:
  zero-shot: each single-object test image is classified among the 18 (colour, shape) classes
    by cosine similarity to the class's text embedding (the mean over prompt templates);
    accuracy = colour and shape both right; also colour, shape and held-out-pair accuracies.
  retrieval: text -> image (and image -> text) recall@1/@5 over test pairs.
"""
from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.nn import clip as clip_lib
from diffusion_jax.nn.image_encoder import VisionConfig
from diffusion_jax.nn.text_encoder import TextEncoderConfig
from diffusion_jax.tokenizer import CLIPTokenizer
from diffusion_jax.train import data as data_lib
from diffusion_jax.train import validate


# Every word of the `shapes` captions, so that each is one token of the word-level vocabulary.
SHAPES_WORDS = tuple(dict.fromkeys(
    ["a", "an"] + list(shapes.SIZES) + list(shapes.COLORS) + list(shapes.SHAPES)
    + " ".join(shapes.REGIONS + shapes.RELATIONS).split()))


def make_tokenizer(config: Any) -> CLIPTokenizer:
  """The CLIP stage's tokenizer: word-level over the `shapes` words, or a saved BPE directory."""
  cfg = config.clip
  if cfg.tokenizer == "shapes_words":
    return CLIPTokenizer.from_words(SHAPES_WORDS, max_length=int(cfg.max_length))
  return CLIPTokenizer.from_pretrained(cfg.tokenizer, max_length=int(cfg.max_length))


def model_config(config: Any, tokenizer: CLIPTokenizer) -> clip_lib.CLIPConfig:
  """The CLIPConfig spelled by `config.clip.model`, with the tokenizer's vocabulary and special ids."""
  m = config.clip.model
  projection = (int(m.projection_dim), "config.clip.model.projection_dim")
  text = validate.module_config(TextEncoderConfig, m.text, "clip.model.text", {
      "vocab_size": (tokenizer.vocab_size, "the tokenizer's vocabulary size"),
      "max_position_embeddings": (tokenizer.max_length, "config.clip.max_length"),
      "eos_token_id": (tokenizer.eos_token_id, "the tokenizer's end token"),
      "pad_token_id": (tokenizer.pad_token_id, "the tokenizer's padding token"),
      "bos_token_id": (tokenizer.bos_token_id, "the tokenizer's begin token"),
      "projection_dim": projection})
  vision = validate.module_config(VisionConfig, m.vision, "clip.model.vision", {
      "image_size": (int(config.data.image_size), "config.data.image_size"), "projection_dim": projection})
  rest = {k: v for k, v in m.items() if k not in ("text", "vision")}
  return validate.module_config(clip_lib.CLIPConfig, rest, "clip.model", text=text, vision=vision)


def init_fn(model: clip_lib.CLIP):
  cfg = model.config

  def init(rng):
    ids = jnp.zeros((1, cfg.text.max_position_embeddings), jnp.int32)
    images = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, cfg.vision.num_channels))
    return model.init(rng, ids, images)["params"]
  return init


class Subset:
  """The records of `source` at `indices`, as a random-access source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.indices[i])]


def max_objects_subset(source, split: str, max_objects: int) -> Subset:
  """The `shapes` examples of `split` with at most `max_objects` objects.

  Record i of a `shapes` split is `shapes.sample_scene(split, i)` rendered, so the object counts
  come from the scene descriptions without reading any image.
  """
  keep = [i for i in range(len(source)) if shapes.sample_scene(split, i).spec.num_objects <= max_objects]
  return Subset(source, keep)


def mask_duplicate_pairs(logits_per_text: jax.Array, tokens: jax.Array) -> jax.Array:
  """Removes pairs whose captions are identical (but are not the matching pair) from the contrast.

  Small caption vocabularies repeat captions within a batch; an image whose caption equals the
  anchor's is not a negative, so it is taken out of both softmaxes (its logit set very low).
  """
  same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)  # [B, B]
  duplicate = same & ~jnp.eye(tokens.shape[0], dtype=bool)
  return jnp.where(duplicate, jnp.float32(-1e9), logits_per_text.astype(jnp.float32))


def make_loss(model: clip_lib.CLIP, mask_duplicates: bool = True):
  """`loss_fn(params, frozen, batch)`; batch: image [B, H, W, 3] in [-1, 1], tokens [B, L].

  The symmetric InfoNCE over the batch, without the pairs of repeated captions when `mask_duplicates`.
  """
  def loss_fn(params, frozen, batch):
    del frozen
    _, logits_per_text = model.apply({"params": params}, batch["tokens"], batch["image"])  # [B, B]
    if mask_duplicates:
      logits_per_text = mask_duplicate_pairs(logits_per_text, batch["tokens"])
    loss = clip_lib.contrastive_loss(logits_per_text)
    labels = jnp.arange(logits_per_text.shape[0])
    accuracy = jnp.mean((jnp.argmax(logits_per_text, axis=-1) == labels).astype(jnp.float32))
    temperature = jnp.exp(jnp.minimum(params["logit_scale"], clip_lib.MAX_LOGIT_SCALE))
    return loss, {"text_to_image_accuracy": accuracy, "temperature": temperature}
  return loss_fn


# ------------------------------------------------------------------------------------------ evaluation


def class_prompts(color: str, shape: str, templates: str) -> list[str]:
  """Prompts describing class (colour, shape): one short phrase, or every single-object caption form."""
  article = "an" if color[0] in "aeiou" else "a"
  if templates == "short":
    return [f"{article} {color} {shape}"]
  return [shapes.caption_of(shapes.CaptionSpec((shapes.ObjectSpec(color, shape, size),), region=region))
          for size in shapes.SIZES for region in shapes.REGIONS]


def make_encoders(model: clip_lib.CLIP):
  """Jitted (params, ids) -> text features and (params, images) -> image features."""
  text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method="encode_text"))
  image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
  return text, image


def _parse(caption: str):
  try:
    return shapes.parse_caption(caption)
  except ValueError:  # not a `shapes` caption: retrieval only
    return None


def _features(fn, params, records, field, mesh, batch_size, tokenizer=None):
  out = []
  for batch, real in data_lib.eval_batches(records, batch_size, (field,), mesh, tokenizer=tokenizer):
    out.append(np.asarray(data_lib.to_host(fn(params, batch[field])))[:real])
  return np.concatenate(out)


def evaluate(encoders, params, tokenizer: CLIPTokenizer, records: list[dict], mesh, *, batch_size: int,
             templates: str = "captions") -> dict[str, float]:
  """Zero-shot colour+shape accuracy on the single-object `records` and retrieval recall on all of them."""
  encode_text, encode_image = encoders
  classes = list(itertools.product(shapes.COLORS, shapes.SHAPES))
  prompts = [p for c, s in classes for p in class_prompts(c, s, templates)]
  per_class = len(prompts) // len(classes)
  prompt_records = [{"caption": p} for p in prompts]
  prompt_features = _features(encode_text, params, prompt_records, "tokens", mesh, batch_size, tokenizer)
  class_features = prompt_features.reshape(len(classes), per_class, -1).mean(axis=1)  # [K, P]

  specs = [_parse(r["caption"]) for r in records]
  image_features = _features(encode_image, params, records, "image", mesh, batch_size)
  text_features = _features(encode_text, params, records, "tokens", mesh, batch_size, tokenizer)
  metrics = {}

  single = [i for i, s in enumerate(specs) if s is not None and s.num_objects == 1]
  if single:
    _, predicted = clip_lib.zero_shot_classify(jnp.asarray(image_features[single]), jnp.asarray(class_features))
    predicted = [classes[int(k)] for k in np.asarray(predicted)]
    truth = [(specs[i].objects[0].color, specs[i].objects[0].shape) for i in single]
    color_ok = np.array([p[0] == t[0] for p, t in zip(predicted, truth)])
    shape_ok = np.array([p[1] == t[1] for p, t in zip(predicted, truth)])
    held_out = np.array([t in shapes.HELD_OUT_PAIRS for t in truth])
    both = color_ok & shape_ok
    metrics.update(zero_shot_accuracy=float(both.mean()), zero_shot_color=float(color_ok.mean()),
                   zero_shot_shape=float(shape_ok.mean()), zero_shot_examples=len(single))
    if held_out.any():
      metrics["zero_shot_accuracy_held_out"] = float(both[held_out].mean())
      metrics["zero_shot_accuracy_seen"] = float(both[~held_out].mean())

  for k in (1, 5):
    recall = clip_lib.retrieval_recall_at_k(jnp.asarray(text_features), jnp.asarray(image_features), k)
    metrics[f"text_to_image_recall@{k}"] = float(recall["text_to_image"])
    metrics[f"image_to_text_recall@{k}"] = float(recall["image_to_text"])
  return metrics
