"""Import and export of diffusers-format pipeline directories.

A diffusers directory holds `model_index.json` and one folder per component (`unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), each with a `config.json` and safetensors weights,
possibly sharded with an `*.index.json`. Any subset of components loads. `load_directory` is the one
loader for the Pipeline and for training; `load_component` loads a single network.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import mmap
import os
import sys
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util
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


class _Checkpoint:
  """The tensors of one component's weight files, read one at a time (views of memory maps)."""

  def __init__(self, files: list[str]):
    self.where: dict[str, Any] = {}
    self.handles: list[SafetensorsFile] = []
    for path in files:
      if path.endswith(".safetensors"):
        handle = SafetensorsFile(path)
        self.handles.append(handle)
        for k in handle.keys():
          self.where[k] = handle
      else:  # explicitly allowed pickle
        import torch  # only needed for this opt-in path
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        for k, v in state.items():
          self.where[k] = {k: v.float().numpy() if v.dtype.is_floating_point else v.numpy()}

  def keys(self) -> list[str]:
    return list(self.where)

  def shape(self, key: str) -> tuple[int, ...]:
    source = self.where[key]
    return source.shape(key) if isinstance(source, SafetensorsFile) else source[key].shape

  def view(self, key: str) -> np.ndarray:
    source = self.where[key]
    return source.get_tensor(key) if isinstance(source, SafetensorsFile) else source[key]

  def release(self, key: str) -> None:
    source = self.where[key]
    if isinstance(source, SafetensorsFile):
      source.release(key)

  def close(self):
    for h in self.handles:
      h.close()
    self.where, self.handles = {}, []


_ALIGN = 64  # XLA's CPU client adopts host buffers aligned so instead of copying them


class _Arena:
  """One anonymous mapping that holds a component's parameters, carved into 64-byte aligned arrays.

  Mapping fresh pages is most of the cost of writing gigabytes of new memory, and one populated
  mapping does it in bulk. (Huge pages, requested with MADV_HUGEPAGE, measured slower: the kernel
  compacts memory for them.) The parameters keep the mapping alive.
  """

  def __init__(self, nbytes: int):
    # MAP_POPULATE: the kernel maps every page at once, a quarter cheaper than faulting each in.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    self._mmap = mmap.mmap(-1, max(nbytes, _ALIGN), flags=flags)
    self._bytes = np.frombuffer(self._mmap, np.uint8)
    self._offset = 0

  @staticmethod
  def size(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN

  def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    out = self._bytes[self._offset:self._offset + nbytes].view(dtype).reshape(shape)
    self._offset += self.size(nbytes)
    return out


_TILE = 64  # output channels per block of a transposing copy
_COPY_THREADS = min(4, os.cpu_count() or 1)


def _to_flax(value: np.ndarray, path: tuple[str, ...], out: np.ndarray) -> np.ndarray:
  """Writes a PyTorch tensor into `out` in the Flax leaf's layout and dtype (one pass over the data).

  Kernels move their output axis (first in PyTorch) to the end; copying blocks of output channels
  keeps both sides in cache, twice as fast as one strided copy of a large kernel.
  """
  axes = keymap.flax_layout_axes(path[-1], value.ndim)
  if axes is None:
    np.copyto(out, value, casting="unsafe")
    return out
  for start in range(0, value.shape[0], _TILE):
    np.copyto(out[..., start:start + _TILE], value[start:start + _TILE].transpose(axes), casting="unsafe")
  return out


def _read_network(checkpoint: _Checkpoint, strip_prefix: str, param_dtype: np.dtype) -> list[tuple]:
  """Every weight in the Flax layout, in one arena -> [(key, path as in the file, path, array)].

  The Flax leaf of each "weight" is guessed from the tensor (`keymap.guess_weight`), so this runs
  while the model's parameter shapes are still being traced; `_check_network` verifies the guess.
  """
  plan = []
  for key in checkpoint.keys():
    path = keymap.flax_path(key, strip_prefix)
    if path is None:
      continue
    shape = checkpoint.shape(key)
    leaf_path = keymap.guess_weight(path, len(shape))
    plan.append((key, path, leaf_path, keymap.flax_shape(leaf_path[-1], shape)))
  arena = _Arena(sum(_Arena.size(math.prod(s) * param_dtype.itemsize) for *_, s in plan))
  outputs = [arena.take(shape, param_dtype) for *_, shape in plan]

  def copy(i):
    key, _, leaf_path, _ = plan[i]
    _to_flax(checkpoint.view(key), leaf_path, outputs[i])
    checkpoint.release(key)

  # numpy copies without the GIL: the cores share the tensors.
  with concurrent.futures.ThreadPoolExecutor(_COPY_THREADS) as pool:
    list(pool.map(copy, sorted(range(len(plan)), key=lambda i: -outputs[i].nbytes)))
  return [(key, path, leaf_path, out) for (key, path, leaf_path, _), out in zip(plan, outputs)]


def _check_network(read: list[tuple], checkpoint: _Checkpoint, target: Any) -> dict:
  """The params tree once it agrees with the model's shapes; else WeightMismatchError naming the keys."""
  expected = traverse_util.flatten_dict(target)
  flat, found, unexpected, mismatched = {}, {}, [], []
  for key, path, leaf_path, value in read:
    if leaf_path not in expected:
      resolved = keymap.resolve_weight(path, expected)
      if resolved not in expected:
        unexpected.append(key)
        continue
      source = checkpoint.view(key)  # the guess was wrong (rare): redo this one tensor
      value = _to_flax(source, resolved, np.empty(keymap.flax_shape(resolved[-1], source.shape), value.dtype))
      leaf_path = resolved
    want = expected[leaf_path]
    found[leaf_path] = key
    if value.shape != tuple(want.shape):
      mismatched.append(keymap.mismatch_line(key, value.shape, want.shape, leaf_path))
      continue
    flat[leaf_path] = value if value.dtype == want.dtype else value.astype(want.dtype)
  error = keymap.mismatch_error(expected, found, unexpected, mismatched)
  if error is not None:
    raise error
  return traverse_util.unflatten_dict(flat)


def read_config(component_dir: str) -> dict:
  with open(os.path.join(component_dir, "config.json")) as f:
    return json.load(f)


def _build_module(directory: str, name: str, dtype, param_dtype, overrides: Mapping[str, Any] | None):
  import jax.numpy as jnp
  spec = COMPONENTS[name]
  config = getattr(_resolve(spec.config_cls), spec.from_config)(read_config(os.path.join(directory, name)))
  if overrides:
    config = dataclasses.replace(config, **overrides)
  module = _resolve(spec.module_cls)(config, dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
  return config, module


_SWITCH_INTERVAL_S = float(os.environ.get("DJ_SWITCH", 2e-4))


@contextlib.contextmanager
def _restore_switch_interval(value: float):
  try:
    yield
  finally:
    sys.setswitchinterval(value)


def _load_networks(directory: str, names: list[str], *, dtype=None, param_dtype=None, allow_pickle: bool = False,
                   config_overrides: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[dict, dict, dict]:
  """Configs, modules and params (put on the device in one `jax.device_put`) of networks of a directory.

  Tracing a model's init for its parameter shapes takes about as long as copying its weights, so it
  runs in a second thread meanwhile; the weights are checked against those shapes before returning.
  """
  configs, modules = {}, {}
  for name in names:
    configs[name], modules[name] = _build_module(directory, name, dtype, param_dtype,
                                                 (config_overrides or {}).get(name))
  switch = sys.getswitchinterval()
  # Tracing holds the GIL for long stretches; a short switch interval lets the copying threads,
  # which need it only between blocks, go on meanwhile.
  sys.setswitchinterval(min(switch, _SWITCH_INTERVAL_S))
  with _restore_switch_interval(switch), concurrent.futures.ThreadPoolExecutor(1) as pool:
    targets = {name: pool.submit(abstract_params, name, modules[name]) for name in names}
    checkpoints: dict[str, _Checkpoint] = {}
    try:
      read = {}
      for name in names:
        spec = COMPONENTS[name]
        checkpoints[name] = _Checkpoint(_weight_files(os.path.join(directory, name), spec.weights_name, allow_pickle))
        read[name] = _read_network(checkpoints[name], spec.strip_prefix, np.dtype(modules[name].param_dtype))
      params = {name: _check_network(read[name], checkpoints[name], targets[name].result()) for name in names}
    finally:
      for f in targets.values():
        f.cancel()
      for c in checkpoints.values():
        c.close()
  return configs, modules, jax.device_put(params)


def load_component(directory: str, name: str, *, dtype=None, param_dtype=None,
                   allow_pickle: bool = False) -> tuple[Any, Any, dict]:
  """Loads one network of a diffusers directory -> (config, flax module, params as jax arrays)."""
  configs, modules, params = _load_networks(os.fspath(directory), [name], dtype=dtype, param_dtype=param_dtype,
                                            allow_pickle=allow_pickle)
  return configs[name], modules[name], params[name]


@dataclasses.dataclass
class LoadedDirectory:
  """What `load_directory` read: networks (configs, flax modules, params), tokenizer and scheduler."""
  path: str                 # the directory the components came from (a training run's model/)
  class_name: str | None    # model_index.json's _class_name; None without one
  configs: dict[str, Any]   # per network loaded: UNetConfig, AutoencoderConfig, TextEncoderConfig
  modules: dict[str, Any]   # per network: the flax.linen module
  params: dict[str, Any]    # per network: jax arrays
  tokenizer: Any            # CLIPTokenizer, or None when not loaded
  scheduler: Any            # SchedulerConfig; the default one when not loaded


def find_directory(path: str | os.PathLike) -> str:
  """The diffusers-format directory at `path`, or in a training run's `model/` subdirectory."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model path {path!r} does not exist or is not a directory")
  model = os.path.join(path, "model")
  if (not os.path.exists(os.path.join(path, "model_index.json")) and not available_components(path)
      and os.path.isdir(model)):
    return model  # a training run: train.py exports the model there
  return path


def load_directory(path: str | os.PathLike, components: Iterable[str] | None = None, *, dtype: Any = None,
                   param_dtype: Any = None, allow_pickle: bool = False,
                   config_overrides: Mapping[str, Mapping[str, Any]] | None = None) -> LoadedDirectory:
  """Loads a diffusers-format directory, or a training run directory (its exported `model/`).

  `components`: any of text_encoder, tokenizer, unet, vae, scheduler; None loads those present
  (a directory with only `unet/` loads the UNet alone). `dtype` is the modules' compute dtype and
  `param_dtype` the parameters' (both float32 by default); `config_overrides` sets our own config
  fields per network, e.g. `{"unet": {"remat": True}}`. Pickle weights load only with `allow_pickle`.
  Raises FileNotFoundError naming the directory and what it lacks.
  """
  from diffusion_jax.diffusion.schedules import SchedulerConfig
  from diffusion_jax.tokenizer import CLIPTokenizer

  root = find_directory(path)
  present = available_components(root)
  wanted = present if components is None else list(components)
  unknown = [c for c in wanted if c not in ALL_COMPONENTS]
  if unknown:
    raise ValueError(f"unknown components {unknown}; choose from {list(ALL_COMPONENTS)}")
  if not present:
    raise FileNotFoundError(f"{root!r} is neither a diffusers-format directory (with any of "
                            f"{', '.join(c + '/' for c in ALL_COMPONENTS)}) nor a training run directory with model/")
  missing = [c for c in wanted if c not in present]
  if missing:
    raise FileNotFoundError(f"{root!r} has no {', '.join(c + '/' for c in missing)} "
                            f"(it holds {', '.join(c + '/' for c in present)})")
  for name in wanted:
    required = {"scheduler": "scheduler_config.json"}.get(name, "config.json" if name in COMPONENTS else None)
    if required and not os.path.exists(os.path.join(root, name, required)):
      raise FileNotFoundError(f"{os.path.join(root, name)!r} has no {required}")
  index = {}
  if os.path.exists(os.path.join(root, "model_index.json")):
    with open(os.path.join(root, "model_index.json")) as f:
      index = json.load(f)
  networks = [c for c in ALL_COMPONENTS if c in COMPONENTS and c in wanted]
  configs, modules, params = _load_networks(root, networks, dtype=dtype, param_dtype=param_dtype,
                                            allow_pickle=allow_pickle, config_overrides=config_overrides)
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")) if "tokenizer" in wanted else None
  scheduler = SchedulerConfig()
  if "scheduler" in wanted:
    scheduler = SchedulerConfig.from_json_file(os.path.join(root, "scheduler", "scheduler_config.json"))
  return LoadedDirectory(root, index.get("_class_name"), configs, modules, params, tokenizer, scheduler)


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
  """The parameter shapes of a component without allocating them (`jax.eval_shape` of its init).

  Tracing the init of SD's UNet takes seconds, as long as reading its weights, so the shapes are
  also kept on disk (`shape_cache_dir`), keyed by the module with its config and the source of the
  network code: a later process reads them back in milliseconds.
  """
  path = _shape_cache_path(name, module)
  cached = _read_shapes(path) if path else None
  if cached is not None:
    return cached
  inputs = example_inputs(name, module.config)
  variables = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))
  params = meta.unbox(variables["params"])
  if path:
    _write_shapes(path, params)
  return params


def shape_cache_dir() -> str | None:
  """Where parameter shapes are kept: $DIFFUSION_JAX_SHAPE_CACHE, else the user's cache directory;
  None (no cache) when that variable is "0" or empty."""
  setting = os.environ.get("DIFFUSION_JAX_SHAPE_CACHE")
  if setting is not None:
    return None if setting in ("", "0") else os.path.expanduser(setting)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "diffusion_jax", "param_shapes")


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
  """The network code's source and the library versions: any change to them changes the shapes' key."""
  import flax
  digest = hashlib.sha256(f"{jax.__version__} {flax.__version__}".encode())
  nn_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nn")
  for file in sorted(os.listdir(nn_dir)):
    if file.endswith(".py"):
      digest.update(file.encode())
      with open(os.path.join(nn_dir, file), "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _shape_cache_path(name: str, module) -> str | None:
  directory = shape_cache_dir()
  if directory is None:
    return None
  key = hashlib.sha256(f"{_code_fingerprint()}\n{name}\n{module!r}".encode()).hexdigest()[:32]
  return os.path.join(directory, f"{name}-{key}.json")


def _read_shapes(path: str) -> dict | None:
  try:
    with open(path) as f:
      entries = json.load(f)
    return traverse_util.unflatten_dict({tuple(p): jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
                             for p, shape, dtype in entries})
  except (OSError, ValueError, TypeError):  # absent or unreadable: trace instead
    return None


def _write_shapes(path: str, params: Any) -> None:
  entries = [[list(p), list(v.shape), np.dtype(v.dtype).name] for p, v in traverse_util.flatten_dict(params).items()]
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(entries, f)
    os.replace(tmp, path)
  except OSError:  # a read-only home only costs the next process the trace
    pass


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


ALL_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")  # in pipeline order


def available_components(directory: str) -> list[str]:
  """Components present in a diffusers directory, in pipeline order."""
  return [c for c in ALL_COMPONENTS if os.path.isdir(os.path.join(directory, c))]
