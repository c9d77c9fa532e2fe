"""Generate images from text with a trained run or a diffusers-format Stable Diffusion directory.

  python sample.py "a large red circle on the left"                      # the default training run
  python sample.py "a photo of a cat" --model ./stable-diffusion-v1-5 --steps 25 --n 4
  python sample.py "a watercolour landscape" --init-image in.png --strength 0.6
  python sample.py --prompts-file prompts.txt --out samples/
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: --huge-pages re-executes the process once
  import sys
  from diffusion_jax import host_memory
  if host_memory.FLAG in sys.argv[1:]:
    host_memory.reexec_with_huge_pages()

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("prompt", nargs="?", help="the text to draw")
  p.add_argument("--prompts-file", help="a text file with one prompt per line (instead of PROMPT)")
  p.add_argument("--model", default="runs/default",
                 help="a training run directory or a diffusers-format directory (default: runs/default)")
  p.add_argument("--steps", type=int, default=20, help="number of sampling steps (default 20)")
  p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 disables it")
  p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale factor (0 disables it)")
  p.add_argument("--sampler", default="dpmpp_2m", help="ddpm, ddim, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras")
  p.add_argument("--seed", type=int, default=0, help="random seed (image i of a prompt uses the same key stream)")
  p.add_argument("--n", type=int, default=1, help="images per prompt")
  p.add_argument("--size", help="HEIGHTxWIDTH or one number (default: the model's native size)")
  p.add_argument("--negative", default=None, help="negative prompt")
  p.add_argument("--init-image", help="start from this image (img2img)")
  p.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the image to repaint (0-1]")
  p.add_argument("--mask", help="inpainting mask image, white = repaint (needs --init-image)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
  p.add_argument("--out", default="samples", help="output folder for PNGs (default: samples/)")
  p.add_argument("--allow-pickle", action="store_true",
                 help="allow loading .bin/.ckpt pickle weights (runs code from the file: trusted files only)")
  p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/diffusion_jax/xla"),
                 help="compilation caches (XLA's, and the traced generation programs in programs/), so a "
                      "second run of the same shape skips tracing and compiling, and the models' parameter shapes ('' "
                      "disables them, and keeps no build of the CPU attention kernel)")
  p.add_argument("--huge-pages", action="store_true",
                 help="CPU runs: restart once with glibc's transparent huge pages for XLA's buffers (faster "
                      "sampling; diffusion_jax/host_memory.py)")
  return p.parse_args(argv)


def fail(message: str) -> None:
  print(f"sample.py: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_size(size: str | None):
  if size is None:
    return None, None
  try:
    parts = [int(s) for s in size.lower().split("x")]
  except ValueError:
    fail(f"--size must be like 512 or 512x768, got {size!r}")
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) <= 0:
    fail(f"--size must be like 512 or 512x768, got {size!r}")
  return parts[0], parts[1]


def main(argv=None):
  args = parse_args(argv)
  if bool(args.prompt) == bool(args.prompts_file):
    fail("give either a PROMPT or --prompts-file")
  if args.prompts_file:
    try:
      with open(args.prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      fail(f"cannot read --prompts-file: {e}")
    if not prompts:
      fail(f"{args.prompts_file} holds no prompt")
  else:
    prompts = [args.prompt]
  if args.mask and not args.init_image:
    fail("--mask needs --init-image")
  if args.steps < 1 or args.n < 1:
    fail("--steps and --n must be positive")
  height, width = parse_size(args.size)
  if not os.path.isdir(args.model):
    fail(f"model path {args.model!r} not found (train one with `python train.py`, or pass --model DIR)")

  # The parameter shapes of the models, kept so that loading skips tracing them (diffusion_jax.convert).
  os.environ.setdefault("DIFFUSION_JAX_SHAPE_CACHE", os.path.join(args.cache_dir, "param_shapes") if args.cache_dir
                        else "0")
  import jax
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image, PngImagePlugin
  from tqdm import tqdm

  import diffusion_jax as dj
  from diffusion_jax.diffusion import samplers
  from diffusion_jax.nn import cpu_attention

  if args.sampler not in samplers.SAMPLERS:
    fail(f"unknown sampler {args.sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  try:
    # Without a cache directory the CPU attention kernel is built afresh and kept nowhere.
    build = cpu_attention.BuildSettings() if args.cache_dir else cpu_attention.BuildSettings(cache_dir=None)
    pipe = dj.Pipeline.from_pretrained(args.model, dtype=jnp.dtype(dtype), allow_pickle=args.allow_pickle,
                                       kernel_build=build)
  except (OSError, ValueError, RuntimeError) as e:
    fail(str(e))
  if args.cache_dir:
    pipe.program_cache_dir = os.path.join(args.cache_dir, "programs")
  kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                num_images=args.n, height=height, width=width, guidance_rescale=args.guidance_rescale)
  if args.init_image:
    kwargs.update(image=args.init_image, strength=args.strength)
  if args.mask:
    kwargs.update(mask=args.mask)
  os.makedirs(args.out, exist_ok=True)
  written = []
  for i, prompt in enumerate(tqdm(prompts, desc="prompts", unit="prompt", disable=len(prompts) == 1)):
    start = time.perf_counter()
    try:
      images = pipe(prompt, args.negative, seed=args.seed + i, progress=True, **kwargs)
    except ValueError as e:
      fail(str(e))
    seconds = time.perf_counter() - start
    for j, image in enumerate(images):
      meta = PngImagePlugin.PngInfo()
      meta.add_text("parameters", json.dumps({
          "prompt": prompt, "negative_prompt": args.negative, "steps": args.steps, "guidance": args.guidance,
          "guidance_rescale": args.guidance_rescale, "sampler": args.sampler, "seed": args.seed + i, "index": j,
          "size": list(image.shape[:2]), "model": os.path.abspath(args.model), "dtype": dtype,
          "init_image": args.init_image, "strength": args.strength if args.init_image else None, "mask": args.mask}))
      path = os.path.join(args.out, f"{len(written):05d}-seed{args.seed + i}-{j}.png")
      Image.fromarray(np.asarray(image)).save(path, pnginfo=meta)
      written.append(path)
    print(f"{len(images)} image(s) for {prompt!r} in {seconds:.1f}s", file=sys.stderr)
  print("\n".join(written))


if __name__ == "__main__":
  main()
