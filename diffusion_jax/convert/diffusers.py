"""Import and export of diffusers-format pipeline directories.

A diffusers directory holds `model_index.json` and one folder per component (`unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), each with a `config.json` and safetensors weights,
possibly sharded with an `*.index.json`. Any subset of components loads.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from flax.linen import meta

from diffusion_jax.convert import keys as keymap
from diffusion_jax.convert.safetensors_io import SafetensorsFile, save_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class UnsafeCheckpointError(RuntimeError):
  """Raised instead of unpickling a file: unpickling runs code chosen by whoever made the file."""


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """How one network component is stored in a diffusers directory."""
  config_cls: str       # "module.path:ClassName"
  module_cls: str
  weights_name: str     # file stem of its weights
  from_config: str      # classmethod reading the reference config.json
  to_config: str        # method writing it
  strip_prefix: str     # prefix of the reference state-dict keys
  library: tuple[str, str]  # model_index.json entry


COMPONENTS: dict[str, ComponentSpec] = {
    "unet": ComponentSpec("diffusion_jax.nn.unet:UNetConfig", "diffusion_jax.nn.unet:UNet",
                          "diffusion_pytorch_model", "from_diffusers", "to_diffusers", "",
                          ("diffusers", "UNet2DConditionModel")),
    "vae": ComponentSpec("diffusion_jax.nn.autoencoder:AutoencoderConfig",
                         "diffusion_jax.nn.autoencoder:AutoencoderKL", "diffusion_pytorch_model",
                         "from_diffusers", "to_diffusers", "", ("diffusers", "AutoencoderKL")),
    "text_encoder": ComponentSpec("diffusion_jax.nn.text_encoder:TextEncoderConfig",
                                  "diffusion_jax.nn.text_encoder:TextEncoder", "model",
                                  "from_transformers", "to_transformers", "text_model.",
                                  ("transformers", "CLIPTextModel")),
}


def _resolve(name: str):
  module, attr = name.split(":")
  return getattr(importlib.import_module(module), attr)


def _weight_files(component_dir: str, stem: str, allow_pickle: bool) -> list[str]:
  """The safetensors files of a component (following a shard index); pickles only on request."""
  index = os.path.join(component_dir, f"{stem}.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(component_dir, s) for s in shards]
  single = os.path.join(component_dir, f"{stem}.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(f for f in os.listdir(component_dir) if f.endswith(".safetensors"))
  if found:
    return [os.path.join(component_dir, f) for f in found]
  pickles = sorted(f for f in os.listdir(component_dir) if f.endswith(PICKLE_SUFFIXES))
  if pickles and not allow_pickle:
    raise UnsafeCheckpointError(
        f"{component_dir} holds only pickle weights ({', '.join(pickles)}). Loading a pickle runs code "
        "from the file; convert it to safetensors, or pass allow_pickle=True (sample.py: --allow-pickle) "
        "if you trust its source.")
  if pickles:
    return [os.path.join(component_dir, p) for p in pickles]
  raise FileNotFoundError(f"no weights ({stem}.safetensors) in {component_dir}")


def _open_tensors(files: list[str]) -> tuple[list[str], Callable[[str], np.ndarray], list[Any]]:
  """All keys across the files and a getter that reads one tensor at a time."""
  where: dict[str, Any] = {}
  handles = []
  for path in files:
    if path.endswith(".safetensors"):
      handle = SafetensorsFile(path)
      handles.append(handle)
      for k in handle.keys():
        where[k] = handle
    else:  # explicitly allowed pickle
      import torch  # only needed for this opt-in path
      state = torch.load(path, map_location="cpu", weights_only=True)
      state = state.get("state_dict", state)
      for k, v in state.items():
        where[k] = {k: v.float().numpy() if v.dtype.is_floating_point else v.numpy()}
  def get(key):
    source = where[key]
    return source.get_tensor(key, copy=True) if hasattr(source, "get_tensor") else source[key]
  return list(where), get, handles


def read_config(component_dir: str) -> dict:
  with open(os.path.join(component_dir, "config.json")) as f:
    return json.load(f)


def load_component(directory: str, name: str, *, dtype=None, param_dtype=None,
                   allow_pickle: bool = False) -> tuple[Any, Any, dict]:
  """Loads one network of a diffusers directory -> (config, flax module, params as jax arrays)."""
  import jax.numpy as jnp
  spec = COMPONENTS[name]
  component_dir = os.path.join(directory, name)
  config = getattr(_resolve(spec.config_cls), spec.from_config)(read_config(component_dir))
  module = _resolve(spec.module_cls)(config, dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
  target = abstract_params(name, module)
  names, get, handles = _open_tensors(_weight_files(component_dir, spec.weights_name, allow_pickle))
  try:
    params = keymap.torch_to_flax(names, get, target, strip_prefix=spec.strip_prefix, convert=jnp.asarray)
  finally:
    for h in handles:
      h.close()
  return config, module, params


def example_inputs(name: str, config: Any) -> tuple:
  """Smallest inputs that initialise a component (parameter shapes do not depend on them)."""
  import jax.numpy as jnp
  if name == "unet":
    s = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, s, s, config.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, config.cross_attention_dim)))
  if name == "vae":
    s = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, s, s, config.in_channels)),)
  if name == "text_encoder":
    return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)
  raise KeyError(name)


def abstract_params(name: str, module) -> dict:
  """The parameter shapes of a component without allocating them (`jax.eval_shape` of its init)."""
  inputs = example_inputs(name, module.config)
  variables = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))
  return meta.unbox(variables["params"])


def save_component(directory: str, name: str, config: Any, params: Any) -> None:
  """Writes one network as `<directory>/<name>/{config.json, <weights>.safetensors}`."""
  spec = COMPONENTS[name]
  component_dir = os.path.join(directory, name)
  os.makedirs(component_dir, exist_ok=True)
  with open(os.path.join(component_dir, "config.json"), "w") as f:
    json.dump(getattr(config, spec.to_config)(), f, indent=2)
  host = jax.tree.map(np.asarray, meta.unbox(params))
  save_file(keymap.flax_to_torch(host, prefix=spec.strip_prefix),
            os.path.join(component_dir, f"{spec.weights_name}.safetensors"), metadata={"format": "pt"})


def write_model_index(directory: str, components: list[str], scheduler_class: str = "PNDMScheduler") -> None:
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
           "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False}
  for name in components:
    if name in COMPONENTS:
      index[name] = list(COMPONENTS[name].library)
  if "tokenizer" in components:
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
  if "scheduler" in components:
    index["scheduler"] = ["diffusers", scheduler_class]
  with open(os.path.join(directory, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


def available_components(directory: str) -> list[str]:
  """Components present in a diffusers directory, in pipeline order."""
  order = ["text_encoder", "tokenizer", "unet", "vae", "scheduler"]
  return [c for c in order if os.path.isdir(os.path.join(directory, c))]
