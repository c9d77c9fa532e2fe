"""Training and evaluation data of the stages: grain iterators, global batches, host transfers."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import parallel
from diffusion_jax.data import get_source, make_dataset
from diffusion_jax.data.transforms import to_model_pixels


def source(config: Any, split: str = "train"):
  """The random-access source of `config.data` for `split`."""
  data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
  data["split"] = split
  return get_source(data)


def train_iterator(config: Any, stage_cfg: Any, *, seed: int, tokenizer=None, records=None):
  """An endless, shuffled grain iterator of this process's share of each global batch.

  `records` replaces the configured source (the diffusion stage's cached latents, a subset).
  Images come as float32 in [-1, 1]; with a tokenizer, captions also as "tokens".
  """
  if records is None:
    records = source(config, "train")
  per_process = int(stage_cfg.batch_size) // jax.process_count()
  return make_dataset(records, batch_size=per_process, seed=seed, shuffle=True, tokenizer=tokenizer,
                      normalize=records_have_images(records), worker_count=int(config.data.worker_count))


def records_have_images(records) -> bool:
  return "image" in records[0]


def global_batch(batch: dict, keys: Sequence[str], mesh) -> dict:
  """The named fields of a host batch, assembled into global arrays split over the mesh."""
  return parallel.make_global_batch({k: np.asarray(batch[k]) for k in keys}, mesh)


def to_host(tree: Any) -> Any:
  """Fully gathered numpy copies of (possibly sharded, multi-process) arrays."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def process_rows(n: int) -> slice:
  """The rows of an n-row global batch that this process supplies."""
  per = n // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def eval_batches(records: Sequence[dict], batch_size: int, fields: Sequence[str], mesh, *, tokenizer=None):
  """Yields (global batch, number of real rows) over `records` in order, the last batch padded.

  The batch size is rounded up to a multiple of the number of batch shards; every process
  passes the same `records` and contributes its own rows.
  """
  shards = jax.device_count()
  batch_size = -(-batch_size // shards) * shards
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    host = {}
    for f in fields:
      if f == "tokens":
        host[f] = np.asarray(tokenizer([r["caption"] for r in chunk]), np.int32)
      elif f == "image":
        host[f] = to_model_pixels(np.stack([r["image"] for r in chunk]))
      else:
        host[f] = np.stack([np.asarray(r[f]) for r in chunk])
    rows = process_rows(batch_size)
    yield parallel.make_global_batch({k: v[rows] for k, v in host.items()}, mesh), real


def read_records(src, indices: Sequence[int]) -> list[dict]:
  return [src[int(i)] for i in indices]
