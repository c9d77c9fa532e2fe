"""Text-to-image, img2img and inpainting with one compiled program per request shape.

Generation is assembled from small pieces, each a function of named inputs:

  inputs        `_prepare`: prompts, sizes, init image and mask checked and turned into arrays
  conditioning  `Conditioning.inputs`: what the denoiser reads, for the prompt and the negative prompt
  denoiser      the UNet, wrapped by each conditioning (`Conditioning.wrap`), then guidance
  sampler loop  `samplers.run_steps`, with the inpainting post-step where there is a mask
  decode        the VAE on the unscaled latents, to pixels in [0, 1]

A new kind of conditioning (ControlNet residuals, image embeddings given as class labels, a
low-resolution image concatenated to the latents) is one more `Conditioning`: its host-side arrays
ride along in the conditioning dicts, and its `wrap` changes what the UNet is called with.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import hardware, parallel, xla_options
from diffusion_jax.convert import diffusers as dconv
from diffusion_jax.data.transforms import as_rgb_uint8, to_model_pixels, to_uint8
from diffusion_jax.diffusion import guidance, samplers
from diffusion_jax.diffusion.schedules import SchedulerConfig
from diffusion_jax.nn import autoencoder as ae
from diffusion_jax.nn import cpu_attention
from diffusion_jax.program_cache import ProgramCache
from diffusion_jax.tokenizer import CLIPTokenizer

# A denoiser: noisy latents [B, h, w, C], timesteps [B], the conditioning dict (batch-first arrays) and
# extra UNet keyword arguments -> the UNet's output [B, h, w, C].
NetFn = Callable[..., jax.Array]


def _to_mask_array(mask, name: str = "mask") -> np.ndarray:
  """float32 [N, H, W] in {0, 1} (1 = repaint) from a PIL image, a path or an array ([N,] H, W[, C])."""
  if isinstance(mask, (str, os.PathLike, Image.Image)):
    mask = as_rgb_uint8(mask, name)
  mask = np.asarray(mask)
  if mask.ndim == 4 or (mask.ndim == 3 and mask.shape[-1] in (1, 3)):
    mask = mask[..., 0]
  if mask.ndim == 2:
    mask = mask[None]
  if mask.dtype == np.uint8:
    mask = mask.astype(np.float32) / 255.0
  return (mask.astype(np.float32) >= 0.5).astype(np.float32)


def _per_image(value, n: int, name: str) -> np.ndarray:
  """An array with one entry per image: a single one is repeated, other counts are refused."""
  if value.shape[0] == 1 and n > 1:
    value = np.repeat(value, n, axis=0)
  if value.shape[0] != n:
    raise ValueError(f"{value.shape[0]} {name}s for {n} images")
  return value


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static settings of one generation: each distinct value is one compiled program."""
  sampler: str
  steps: int
  start_step: int  # the first sampler step run (img2img starts part of the way down)
  guided: bool  # classifier-free guidance (scale > 1)
  rescaled: bool  # guidance rescale (> 0, with guidance)
  start: str  # "noise", "image" (img2img) or "inpaint"
  stepwise: bool  # one program per step, for a progress bar


@dataclasses.dataclass
class Request:
  """One call's checked inputs: static settings and the arrays the compiled program takes."""
  settings: Settings
  plan: samplers.SamplerPlan
  # Named arrays, batch first: "noise" [N, h, w, C], "cond" and "uncond" (conditioning dicts),
  # "image" [N, H, W, 3] in [-1, 1] and "mask" [N, h, w, 1] where they apply, "scale" and "rescale" [].
  arrays: dict
  num_images: int


class Conditioning(Protocol):
  """One piece of conditioning: host-side arrays for the denoiser, and how the denoiser uses them."""
  arguments: tuple[str, ...]  # the pipeline call's keyword arguments that this piece reads

  def inputs(self, pipe: "Pipeline", prompts: list[str], negatives: list[str],
             kwargs: dict) -> tuple[dict, dict]:
    """(entries for the conditional branch, entries for the unconditional one), arrays [N, ...].

    `kwargs` holds the call's `guidance_scale` and the keyword arguments named in `arguments`.
    """

  def wrap(self, net_fn: NetFn, params: dict) -> NetFn:
    """The denoiser with this conditioning applied (traced inside the compiled program)."""


@dataclasses.dataclass(frozen=True)
class TextConditioning:
  """The prompt's token states as the UNet's cross-attention context ("context")."""
  arguments: tuple[str, ...] = ()

  def inputs(self, pipe, prompts, negatives, kwargs):
    cond = pipe.encode_prompt(prompts)
    uncond = pipe.encode_prompt(negatives) if kwargs["guidance_scale"] > 1.0 else cond
    return {"context": cond}, {"context": uncond}

  def wrap(self, net_fn, params):
    return net_fn  # the UNet reads cond["context"] itself


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
  # Where traced generation programs are kept between processes (`program_cache.ProgramCache`): a new
  # process then skips tracing them (XLA's persistent cache skips compiling). None: traced in each process.
  program_cache_dir: str | None = None
  # The conditioning pieces, applied in order around the UNet (the text is always the first).
  conditionings: tuple = (TextConditioning(),)

  def __post_init__(self):
    self._compiled: dict = {}
    self._placed_leaves: tuple = ()  # ids of the leaves of `params` as last placed on the devices

  # ---------------------------------------------------------------- loading and saving
  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype: Any = None, allow_pickle: bool = False,
                      kernel_build: cpu_attention.BuildSettings | None = None) -> "Pipeline":
    """Loads a diffusers-format directory, or a training run directory (its exported `model/`).

    Returns the pipeline that `model_index.json`'s `_class_name` names (see `PIPELINES`); a class
    this package does not implement is refused, naming it. `dtype` is the compute dtype (parameters
    stay float32); components missing from the directory are None, so a directory with only `unet/`
    loads the UNet alone. How the models run (attention kernel, chunking, upsampling form) is chosen
    once here for `jax.devices()` (`hardware.configure`); `kernel_build` says how the CPU attention
    kernel is built where it is chosen.
    """
    loaded = dconv.load_directory(path, dtype=dtype, allow_pickle=allow_pickle)
    pipeline_cls = pipeline_class(loaded.class_name, loaded.path)
    if cls is not Pipeline and not issubclass(pipeline_cls, cls):
      raise ValueError(f"{loaded.path!r} holds a {pipeline_cls.__name__}, not a {cls.__name__}")
    configs, modules = dict(loaded.configs), dict(loaded.modules)
    for name, config in loaded.configs.items():
      chosen = hardware.configure(config, jax.devices(), dtype or jnp.float32, force=True, build=kernel_build)
      if chosen is not config:
        configs[name], modules[name] = chosen, modules[name].clone(config=chosen)
    return pipeline_cls(loaded.tokenizer, modules.get("text_encoder"), modules.get("vae"), modules.get("unet"),
                        loaded.params, loaded.scheduler, configs)

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
               guidance_rescale: float = 0.0, output_type: str = "uint8", progress: bool = False,
               **conditioning_kwargs) -> np.ndarray:
    """Generates images: uint8 [N, H, W, 3] (or float in [0, 1] with output_type="np").

    One image per prompt times `num_images`. `latents` ([N, h, w, C] standard normal) replaces the
    seeded noise; `image` (+`strength`) starts from a picture; `mask` (1 = repaint) with `image` inpaints.
    `progress=True` shows a per-step progress bar (the loop then runs one jitted step at a time).
    Other keyword arguments go to the pipeline's conditionings.
    """
    if output_type not in ("uint8", "np"):
      raise ValueError(f"output_type must be 'uint8' or 'np', got {output_type!r}")
    request = self._prepare(prompt, negative_prompt, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images=num_images,
                            height=height, width=width, latents=latents, image=image, strength=strength,
                            mask=mask, guidance_rescale=guidance_rescale, progress=progress, **conditioning_kwargs)
    program = self._program(request.settings, request.plan)
    arrays = _shard_batch(request.arrays, request.num_images)
    key = jax.random.key(seed)
    if request.settings.stepwise:
      images = _run_with_progress(program, self._replicated_params(), arrays, key, request.settings)
    else:
      images = program(self._replicated_params(), arrays, key)
    images = np.asarray(images)[:request.num_images]
    return images if output_type == "np" else to_uint8(images, (0.0, 1.0))

  def _prepare(self, prompt, negative_prompt, *, num_inference_steps, guidance_scale, sampler, seed, num_images,
               height, width, latents, image, strength, mask, guidance_rescale, progress,
               **conditioning_kwargs) -> Request:
    """Checks the call's arguments and turns them into a `Request` (host side, before any program)."""
    self._require("tokenizer", "text_encoder", "vae", "unet")
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    if num_inference_steps < 1:
      raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images)]
    n = len(prompts)
    negatives = negative_prompt if negative_prompt is not None else ""
    negatives = [negatives] * n if isinstance(negatives, str) else [p for p in negatives for _ in range(num_images)]
    if len(negatives) != n:
      raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")

    arrays: dict = {}
    if image is not None:
      init = _per_image(as_rgb_uint8(image, "init image"), n, "init image")
      height, width = init.shape[1:3]
      arrays["image"] = jnp.asarray(to_model_pixels(init))  # [N, H, W, 3] in [-1, 1]
    height = height or self.default_size
    width = width or self.default_size
    f = self.latent_factor
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), got {height}x{width}")
    h, w, c = height // f, width // f, self.configs["unet"].in_channels

    if latents is None:
      latents = jax.random.normal(jax.random.key(seed), (n, h, w, c), jnp.float32)
    arrays["noise"] = jnp.asarray(latents, jnp.float32)
    if arrays["noise"].shape != (n, h, w, c):
      raise ValueError(f"latents must have shape {(n, h, w, c)}, got {tuple(arrays['noise'].shape)}")

    start = "noise" if image is None else "image"
    if mask is not None:
      if image is None:
        raise ValueError("inpainting needs `image` as well as `mask`")
      mask_arr = _per_image(_to_mask_array(mask), n, "mask")
      if mask_arr.shape[1:] != (height, width):
        raise ValueError(f"mask is {mask_arr.shape[1]}x{mask_arr.shape[2]} but the image is {height}x{width}")
      # [N, H, W] -> [N, h, w, 1]: a latent is repainted if any of its pixels is.
      arrays["mask"] = jnp.asarray(mask_arr.reshape(n, h, f, w, f).max(axis=(2, 4))[..., None])
      start = "inpaint"

    start_step = 0
    if start == "image":
      if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
      start_step = samplers.img2img_start_step(num_inference_steps, strength)
    if start_step >= num_inference_steps:
      raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run")

    claimed = {name for piece in self.conditionings for name in piece.arguments}
    unknown = sorted(set(conditioning_kwargs) - claimed)
    if unknown:
      raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)} for this pipeline")
    arrays["cond"], arrays["uncond"] = {}, {}
    kwargs = dict(conditioning_kwargs, guidance_scale=guidance_scale)
    for piece in self.conditionings:
      cond, uncond = piece.inputs(self, prompts, negatives, kwargs)
      arrays["cond"].update(cond)
      arrays["uncond"].update(uncond)
    guided = guidance_scale > 1.0
    arrays["scale"] = jnp.float32(guidance_scale)
    arrays["rescale"] = jnp.float32(guidance_rescale)
    settings = Settings(sampler, num_inference_steps, start_step, guided, guided and guidance_rescale > 0, start,
                        bool(progress))
    return Request(settings, samplers.make_plan(sampler, self.scheduler, num_inference_steps), arrays, n)

  def _replicated_params(self) -> dict:
    """`params` replicated over all devices, placed once (again only after a leaf is replaced)."""
    if tuple(map(id, jax.tree.leaves(self.params))) != self._placed_leaves:
      self.params = jax.device_put(self.params, parallel.replicated(_mesh()))
      self._placed_leaves = tuple(map(id, jax.tree.leaves(self.params)))
    return self.params

  # ---------------------------------------------------------------- the compiled pieces
  def _denoiser(self, params: dict) -> NetFn:
    """The UNet, wrapped by every conditioning: `net_fn(x, t, cond, **unet_kwargs)`."""
    def unet_fn(x, t, cond, **unet_kwargs):  # [B, h, w, C], [B], {"context": [B, L, D], ...}
      return self.unet.apply({"params": params["unet"]}, x, t, cond["context"], **unet_kwargs)

    net_fn = unet_fn
    for piece in self.conditionings:
      net_fn = piece.wrap(net_fn, params)
    return net_fn

  def _begin(self, settings: Settings, plan, params, arrays):
    """-> (sampler loop state, clean init latents or None): the starting point of the loop."""
    init_latents = None
    if settings.start != "noise":
      mean, _ = self.vae.apply({"params": params["vae"]}, arrays["image"], method="encode")
      init_latents = ae.scale_latents(mean, self.configs["vae"])
    state = samplers.initial_state(settings.sampler, arrays["noise"], plan, start_step=settings.start_step,
                                   init_latents=init_latents if settings.start == "image" else None)
    return _batch_sharded(state), init_latents

  def _advance(self, settings: Settings, plan, params, arrays, key, state, init_latents, first, count: int):
    """Runs `count` sampler steps from step `first` on the loop state."""
    net_fn = self._denoiser(params)
    model_fn = guidance.guided_model_fn(net_fn, arrays["cond"], arrays["uncond"],
                                        arrays["scale"] if settings.guided else 1.0,
                                        arrays["rescale"] if settings.rescaled else 0.0)
    post_step = None
    if settings.start == "inpaint":
      post_step = samplers.inpaint_post_step(plan, init_latents, arrays["noise"], arrays["mask"])
    state = samplers.run_steps(settings.sampler, model_fn, state, plan, key, first=first, count=count,
                               post_step=post_step)
    # Pinned to the input's layout (XLA would otherwise choose the output's sharding): a step's output
    # is the next step's input, so one compiled step serves them all.
    return _batch_sharded(state)

  def _finish(self, settings: Settings, params, arrays, state, init_latents):
    """The loop's final latents -> images [B, H, W, 3] in [0, 1]."""
    latents = state[0]
    if settings.start == "inpaint":  # the last step lands on x0: paste the exact known latents
      latents = arrays["mask"] * latents + (1.0 - arrays["mask"]) * init_latents
    images = self.vae.apply({"params": params["vae"]}, ae.unscale_latents(latents, self.configs["vae"]),
                            method="decode")
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def _program(self, settings: Settings, plan):
    """The jitted generation for one `Settings`: `program(params, arrays, key) -> images`.

    With `settings.stepwise` (for a progress bar), three programs, `(begin, advance, finish)`, and
    `advance` runs one step at a given index (see `_run_with_progress`): a host callback inside one
    program would report progress too, but XLA's persistent compilation cache does not store programs
    that hold one, so every new process would compile the whole loop again.
    """
    cache_key = (settings, self.program_cache_dir)
    if cache_key in self._compiled:
      return self._compiled[cache_key]
    s = settings

    def begin(params, arrays):
      return self._begin(s, plan, params, arrays)

    def advance(params, arrays, key, state, init_latents, first):
      return self._advance(s, plan, params, arrays, key, state, init_latents, first, count=1)

    def finish(params, arrays, state, init_latents):
      return self._finish(s, params, arrays, state, init_latents)

    def run(params, arrays, key):
      state, init_latents = self._begin(s, plan, params, arrays)
      state = self._advance(s, plan, params, arrays, key, state, init_latents, s.start_step,
                            count=s.steps - s.start_step)
      return self._finish(s, params, arrays, state, init_latents)

    def jit(fn, piece: str):
      options = xla_options.compiler_options()
      jitted = jax.jit(fn, compiler_options=options)
      if self.program_cache_dir is None:
        return jitted
      # Everything the traced program depends on besides the package's source and the arguments.
      description = ("Pipeline", piece, s, options, self.unet, self.vae, self.configs.get("vae"), self.scheduler,
                     plan, self.conditionings)
      return ProgramCache(self.program_cache_dir).wrap(jitted, description, options)

    if s.stepwise:
      program = (jit(begin, "begin"), jit(advance, "advance"), jit(finish, "finish"))
    else:
      program = jit(run, "run")
    self._compiled[cache_key] = program
    return program


def _run_with_progress(program, params, arrays, key, settings: Settings):
  """Runs `_program(...)` of a stepwise `settings` a step at a time under a progress bar; returns the images.

  Step i + 1 is queued before the bar waits for step i, so the device never waits on the host.
  """
  from tqdm import tqdm

  begin, advance, finish = program
  state, init_latents = begin(params, arrays)
  with tqdm(total=settings.steps - settings.start_step, desc="sampling", unit="step") as bar:
    previous = None
    for i in range(settings.start_step, settings.steps):
      state = advance(params, arrays, key, state, init_latents, np.int32(i))
      if previous is not None:
        previous.block_until_ready()
        bar.update(1)
      previous = state[0]
    previous.block_until_ready()
    bar.update(1)
  return finish(params, arrays, state, init_latents)


# `model_index.json`'s `_class_name` -> the pipeline that runs it. Img2img and inpainting with a plain
# 4-channel UNet are calls of the text-to-image pipeline, as diffusers' directories of those classes are.
PIPELINES: dict[str, type] = {
    "StableDiffusionPipeline": Pipeline,
    "StableDiffusionImg2ImgPipeline": Pipeline,
}


def pipeline_class(class_name: str | None, path: str = "") -> type:
  """The pipeline for `model_index.json`'s `_class_name` (text-to-image where none is named)."""
  if class_name is None:
    return Pipeline
  if class_name not in PIPELINES:
    raise ValueError(f"{path!r} holds a {class_name}, which this version does not implement "
                     f"(supported: {', '.join(sorted(PIPELINES))})")
  return PIPELINES[class_name]


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


def _shard_batch(arrays: dict, n: int) -> dict:
  """Pads every batch-first array to a multiple of the device count and shards it; scalars are replicated."""
  mesh = _mesh()
  pad = -n % mesh.size

  def place(x):
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(mesh, P()))
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
    return jax.device_put(x, NamedSharding(mesh, P("data")))

  return jax.tree.map(place, arrays)
