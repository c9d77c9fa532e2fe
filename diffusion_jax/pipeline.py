"""Text-to-image, img2img and inpainting with one compiled program per request shape."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import parallel, xla_options
from diffusion_jax.convert import diffusers as dconv
from diffusion_jax.diffusion import guidance, samplers
from diffusion_jax.diffusion.schedules import SchedulerConfig
from diffusion_jax.program_cache import ProgramCache
from diffusion_jax.tokenizer import CLIPTokenizer


def _as_array(image, mode: str, name: str) -> np.ndarray:
  """A path or PIL image -> array in PIL `mode` ("RGB" or "L"); arrays pass through."""
  from PIL import Image
  if isinstance(image, (str, os.PathLike)):
    try:
      with Image.open(image) as im:
        return np.asarray(im.convert(mode))
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read {name} {os.fspath(image)!r}: {e}") from None
  if isinstance(image, Image.Image):
    return np.asarray(image.convert(mode))
  return np.asarray(image)


def _to_rgb_array(image, name: str) -> np.ndarray:
  """uint8 [N, H, W, 3] from a PIL image, a path, or an array (uint8 or float in [0, 1])."""
  image = _as_array(image, "RGB", name)
  if image.dtype != np.uint8:
    image = np.round(np.clip(image.astype(np.float32), 0, 1) * 255).astype(np.uint8)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"{name} must be [N, H, W, 3] RGB, got shape {image.shape}")
  return image


def _to_mask_array(mask, name: str = "mask") -> np.ndarray:
  """float32 [N, H, W] in {0, 1} (1 = repaint) from a PIL image, a path or an array."""
  mask = _as_array(mask, "L", name)
  if mask.ndim == 4:
    mask = mask[..., 0]
  if mask.ndim == 2:
    mask = mask[None]
  if mask.dtype == np.uint8:
    mask = mask.astype(np.float32) / 255.0
  return (mask.astype(np.float32) >= 0.5).astype(np.float32)


@dataclasses.dataclass
class Pipeline:
  """Stable-Diffusion-style generation. Create with `Pipeline.from_pretrained(path)`."""
  tokenizer: CLIPTokenizer | None
  text_encoder: Any
  vae: Any
  unet: Any
  params: dict
  scheduler: SchedulerConfig
  configs: dict = dataclasses.field(default_factory=dict)
  # Where compiled generation programs are kept between processes (`program_cache.ProgramCache`): a new
  # process then skips tracing and compiling them. None: compiled in each process.
  program_cache_dir: str | None = None

  def __post_init__(self):
    self._compiled: dict = {}
    self._placed_leaves: tuple = ()  # ids of the leaves of `params` as last placed on the devices

  # ---------------------------------------------------------------- loading and saving
  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype: Any = None, allow_pickle: bool = False) -> "Pipeline":
    """Loads a diffusers-format directory, or a training run directory (its exported `model/`).

    `dtype` is the compute dtype (parameters stay float32); components missing from the
    directory are None, so a directory with only `unet/` loads the UNet alone.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"model path {path!r} does not exist or is not a directory")
    if not os.path.exists(os.path.join(path, "model_index.json")) and os.path.isdir(os.path.join(path, "model")):
      path = os.path.join(path, "model")  # a training run: train.py exports the model there
    present = dconv.available_components(path)
    if not present:
      raise FileNotFoundError(f"{path!r} is neither a diffusers-format directory (unet/, vae/, text_encoder/, "
                              "tokenizer/, scheduler/) nor a training run directory with model/")
    modules, params, configs = {}, {}, {}
    for name in dconv.COMPONENTS:
      if name in present:
        configs[name], modules[name], params[name] = dconv.load_component(
            path, name, dtype=dtype, allow_pickle=allow_pickle)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")) if "tokenizer" in present else None
    scheduler = SchedulerConfig()
    if "scheduler" in present:
      with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        scheduler = SchedulerConfig.from_dict(json.load(f))
    return cls(tokenizer, modules.get("text_encoder"), modules.get("vae"), modules.get("unet"),
               params, scheduler, configs)

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Exports a diffusers-format directory that diffusers' StableDiffusionPipeline loads."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in dconv.COMPONENTS:
      if name in self.params:
        dconv.save_component(directory, name, self.configs[name], self.params[name])
        written.append(name)
    if self.tokenizer is not None:
      self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
      written.append("tokenizer")
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(self.scheduler.to_dict(), f, indent=2)
    written.append("scheduler")
    dconv.write_model_index(directory, written, self.scheduler.to_dict().get("_class_name", "PNDMScheduler"))

  # ---------------------------------------------------------------- pieces
  def _require(self, *names):
    missing = [n for n in names if getattr(self, n) is None]
    if missing:
      raise ValueError(f"this pipeline was loaded without {', '.join(missing)}")

  @property
  def latent_factor(self) -> int:
    return 2 ** (len(self.configs["vae"].block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    return self.configs["unet"].sample_size * self.latent_factor

  def encode_prompt(self, prompts: Sequence[str] | str) -> jax.Array:
    """Prompts -> text states [N, L, D] that the UNet cross-attends to."""
    self._require("tokenizer", "text_encoder")
    ids = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts))
    return self._encode_ids(self.params["text_encoder"], jnp.asarray(ids))

  @functools.partial(jax.jit, static_argnums=0)
  def _encode_ids(self, params, ids):
    return self.text_encoder.apply({"params": params}, ids)[0]

  def __hash__(self):  # jit's static self: identity is the right notion here
    return id(self)

  def __eq__(self, other):
    return self is other

  # ---------------------------------------------------------------- generation
  def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
               num_inference_steps: int = 20, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
               seed: int = 0, num_images: int = 1, height: int | None = None, width: int | None = None,
               latents: Any = None, image: Any = None, strength: float = 0.8, mask: Any = None,
               guidance_rescale: float = 0.0, output_type: str = "uint8", progress: bool = False) -> np.ndarray:
    """Generates images: uint8 [N, H, W, 3] (or float in [0, 1] with output_type="np").

    One image per prompt times `num_images`. `latents` ([N, h, w, C] standard normal) replaces the
    seeded noise; `image` (+`strength`) starts from a picture; `mask` (1 = repaint) with `image` inpaints.
    `progress=True` shows a per-step progress bar (the loop then runs one jitted step at a time).
    """
    self._require("tokenizer", "text_encoder", "vae", "unet")
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    if num_inference_steps < 1:
      raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if output_type not in ("uint8", "np"):
      raise ValueError(f"output_type must be 'uint8' or 'np', got {output_type!r}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images)]
    n = len(prompts)
    negatives = negative_prompt if negative_prompt is not None else ""
    negatives = [negatives] * n if isinstance(negatives, str) else [p for p in negatives for _ in range(num_images)]
    if len(negatives) != n:
      raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")

    init = None
    if image is not None:
      init = _to_rgb_array(image, "init image")
      if init.shape[0] == 1 and n > 1:
        init = np.repeat(init, n, axis=0)
      height, width = init.shape[1:3]
    height = height or self.default_size
    width = width or self.default_size
    f = self.latent_factor
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), got {height}x{width}")
    if init is not None and init.shape[0] != n:
      raise ValueError(f"{init.shape[0]} init images for {n} prompts")
    h, w, c = height // f, width // f, self.configs["unet"].in_channels

    if latents is None:
      latents = jax.random.normal(jax.random.key(seed), (n, h, w, c), jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape != (n, h, w, c):
      raise ValueError(f"latents must have shape {(n, h, w, c)}, got {tuple(latents.shape)}")

    mask_arr = None
    if mask is not None:
      if init is None:
        raise ValueError("inpainting needs `image` as well as `mask`")
      mask_arr = _to_mask_array(mask)
      if mask_arr.shape[1:] != (height, width):
        raise ValueError(f"mask is {mask_arr.shape[1]}x{mask_arr.shape[2]} but the image is {height}x{width}")
      if mask_arr.shape[0] == 1 and n > 1:
        mask_arr = np.repeat(mask_arr, n, axis=0)
      # [N, H, W] -> [N, h, w, 1]: a latent is repainted if any of its pixels is.
      mask_arr = mask_arr.reshape(n, h, f, w, f).max(axis=(2, 4))[..., None]

    plan = samplers.make_plan(sampler, self.scheduler, num_inference_steps)
    start_step = 0
    if init is not None and mask is None:
      if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
      start_step = samplers.img2img_start_step(num_inference_steps, strength)
    if start_step >= num_inference_steps:
      raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run")

    cond = self.encode_prompt(prompts)
    use_cfg = guidance_scale > 1.0
    uncond = self.encode_prompt(negatives) if use_cfg else cond
    init_pixels = None if init is None else jnp.asarray(init, jnp.float32) / 127.5 - 1.0

    key = jax.random.key(seed)
    program = self._program(sampler, num_inference_steps, use_cfg, guidance_rescale > 0, start_step,
                            init is not None, mask is not None, plan, bool(progress))
    args = _shard_batch((self._replicated_params(), cond, uncond, latents, key, init_pixels,
                         None if mask_arr is None else jnp.asarray(mask_arr),
                         jnp.float32(guidance_scale), jnp.float32(guidance_rescale)), n)
    if progress:
      images = _run_with_progress(program, args, start_step, num_inference_steps)
    else:
      images = program(*args)
    images = np.asarray(images)[:n]
    if output_type == "np":
      return images
    return np.round(images * 255).astype(np.uint8)

  def _replicated_params(self) -> dict:
    """`params` replicated over all devices, placed once (again only after a leaf is replaced)."""
    if tuple(map(id, jax.tree.leaves(self.params))) != self._placed_leaves:
      self.params = jax.device_put(self.params, parallel.replicated(_mesh()))
      self._placed_leaves = tuple(map(id, jax.tree.leaves(self.params)))
    return self.params

  def _program(self, sampler, steps, use_cfg, rescale_on, start_step, has_init, has_mask, plan, stepwise):
    """The jitted generation for one static configuration: text states to images.

    Normally one program: the sampling loop, guidance and the VAE decode. With `stepwise` (for a
    progress bar), three, `(begin, advance, finish)`, and `advance` runs one step at a given index
    (see `_run_with_progress`): a host callback inside one program would report progress too, but
    XLA's persistent compilation cache does not store programs that hold one, so every new process
    would compile the whole loop again.
    """
    use_rescale = use_cfg and rescale_on
    cache_key = (sampler, steps, use_cfg, use_rescale, start_step, has_init, has_mask, stepwise,
                 self.program_cache_dir)
    if cache_key in self._compiled:
      return self._compiled[cache_key]
    scaling = self.configs["vae"].scaling_factor

    def begin(params, noise, init_pixels):  # -> loop state, clean init latents (None: text to image)
      init_latents = None
      if has_init:
        mean, _ = self.vae.apply({"params": params["vae"]}, init_pixels, method="encode")
        init_latents = mean * scaling
      state = samplers.initial_state(sampler, noise, plan, start_step=start_step,
                                     init_latents=None if has_mask else init_latents)
      return _batch_sharded(state), init_latents

    def advance(params, state, first, cond, uncond, noise, rng, init_latents, mask, scale, rescale, *, count):
      def net_fn(x, t, context):  # [B, h, w, C], [B], [B, L, D] -> model output
        return self.unet.apply({"params": params["unet"]}, x, t, context)

      model_fn = guidance.guided_model_fn(net_fn, cond, uncond, scale if use_cfg else 1.0,
                                          rescale if use_rescale else 0.0)
      post_step = samplers.inpaint_post_step(plan, init_latents, noise, mask) if has_mask else None
      state = samplers.run_steps(sampler, model_fn, state, plan, rng, first=first, count=count,
                                 post_step=post_step)
      # Pinned to the input's layout (XLA would otherwise choose the output's sharding): a step's output
      # is the next step's input, so one compiled step serves them all.
      return _batch_sharded(state)

    def finish(params, state, init_latents, mask):
      latents = state[0]
      if has_mask:  # the last step lands on x0: paste the exact known latents
        latents = mask * latents + (1.0 - mask) * init_latents
      images = self.vae.apply({"params": params["vae"]}, latents / scaling, method="decode")
      return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)  # [B, H, W, 3]

    def run(params, cond, uncond, noise, rng, init_pixels, mask, scale, rescale):
      state, init_latents = begin(params, noise, init_pixels)
      state = advance(params, state, start_step, cond, uncond, noise, rng, init_latents, mask, scale, rescale,
                      count=steps - start_step)
      return finish(params, state, init_latents, mask)

    def jit(fn, piece: str):
      options = xla_options.compiler_options()
      jitted = jax.jit(fn, compiler_options=options)
      if self.program_cache_dir is None:
        return jitted
      # Everything the traced program depends on besides the package's source and the arguments.
      description = ("Pipeline", piece, cache_key[:-1], options, self.unet, self.vae, self.scheduler, plan)
      return ProgramCache(self.program_cache_dir).wrap(jitted, description)

    if stepwise:
      program = (jit(begin, "begin"), jit(functools.partial(advance, count=1), "advance"), jit(finish, "finish"))
    else:
      program = jit(run, "run")
    self._compiled[cache_key] = program
    return program


def _run_with_progress(program, args, start_step: int, steps: int):
  """Runs `_program(..., stepwise=True)` a step at a time under a progress bar; returns the images.

  Step i + 1 is queued before the bar waits for step i, so the device never waits on the host.
  """
  from tqdm import tqdm

  begin, advance, finish = program
  params, cond, uncond, noise, rng, init_pixels, mask, scale, rescale = args
  state, init_latents = begin(params, noise, init_pixels)
  with tqdm(total=steps - start_step, desc="sampling", unit="step") as bar:
    previous = None
    for i in range(start_step, steps):
      state = advance(params, state, np.int32(i), cond, uncond, noise, rng, init_latents, mask, scale, rescale)
      if previous is not None:
        previous.block_until_ready()
        bar.update(1)
      previous = state[0]
    previous.block_until_ready()
    bar.update(1)
  return finish(params, state, init_latents, mask)


@functools.lru_cache(maxsize=None)
def _mesh_of(devices: tuple) -> Mesh:
  return parallel.make_mesh({"data": -1}, devices)


def _mesh() -> Mesh:
  """Every device on the data axis: generation is data parallel."""
  return _mesh_of(tuple(jax.devices()))


def _batch_sharded(tree):
  """Constrains arrays with a batch axis to be split along it over the devices, scalars to be replicated."""
  mesh = _mesh()
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data") if x.ndim else P())), tree)


def _shard_batch(args, n: int):
  """Pads the batch to a multiple of the device count and shards it; `params` are already replicated."""
  mesh = _mesh()
  pad = -n % mesh.size
  batch = NamedSharding(mesh, P("data"))

  def place(x):
    if x is None:
      return None
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
    return jax.device_put(x, batch)

  params, cond, uncond, noise, key, init, mask, scale, rescale = args
  return (params, place(cond), place(uncond), place(noise), key, place(init), place(mask), scale, rescale)
