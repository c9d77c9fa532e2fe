"""Text-to-image sampling speed: 20-step dpmpp_2m with classifier-free guidance through `diffusion_jax.Pipeline`.

  python benchmarks/sample.py                                  # the default config's shapes model, then SD 1.5 sizes
  python benchmarks/sample.py --settings default --run runs/default --out benchmarks/results/sample.json

For each setting, two processes run one after the other on fresh caches, as sample.py sets them up:
XLA's persistent compilation cache (jax_compilation_cache_dir) and the pipeline's compiled programs
(`Pipeline.program_cache_dir`, its programs/ subdirectory: traced programs, `jax.export`). The first
process traces and compiles everything (cold caches), the second loads the traced programs and finds
their executables in XLA's cache. Each process reports

  - compile_s: tracing + lowering + XLA compilation (or, within it, cache retrieval) of every program,
    plus storing and loading the pipeline's traced programs, from jax.monitoring events, and
    first_call_s: the first generation, compilation included;
  - total_ms: median of the whole generations after the first (text encoding, 20 guided steps,
    VAE decode, host transfer; `--repeats` generations in all);
  - unet_ms: the same number of bare, jitted UNet calls at the same (doubled, guided) batch: 20 calls
    on 2N latents, i.e. the 40 UNet evaluations of a guided 20-step run, alternating with the
    generations; overhead = total / unet - 1, and overhead_paired = the median over the pairs of
    (generation / the bare loop run right after it) - 1, the steadier of the two on a busy machine.

Settings: `default` loads a training run (`--run`) if present, else random weights with the sizes of
configs/default.py (64x64 images, 16x16x4 latents); `sd15` uses random weights with Stable Diffusion
1.5's sizes (UNet, VAE, CLIP ViT-L text tower; a word-level tokenizer), 512x512 images.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STEPS = 20
PROMPT = "a large red circle on the left"
# jax.monitoring duration events that together make up the compile time of a program.
# backend_compile_duration wraps the persistent-cache lookup, so cache_retrieval_time_sec (reported on its
# own) is a part of it, not an addition.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration",
                  # storing and loading the pipeline's traced programs (diffusion_jax.program_cache)
                  "/diffusion_jax/program_cache/save_sec", "/diffusion_jax/program_cache/load_sec")
REPORTED_EVENTS = COMPILE_EVENTS + ("/jax/compilation_cache/cache_retrieval_time_sec",)


# ---------------------------------------------------------------------------------------------- pipelines
def random_params(module, key, *inputs, **kwargs):
  import jax
  from flax.linen import meta
  return jax.jit(lambda k: meta.unbox(module.init(k, *inputs, **kwargs)["params"]))(key)


def default_pipeline(run_dir: str | None):
  """The default config's pipeline: a trained run if there is one, else random weights of its sizes."""
  from diffusion_jax import Pipeline
  if run_dir and os.path.isdir(run_dir):
    return Pipeline.from_pretrained(run_dir), f"trained run {run_dir}"
  sys.path.insert(0, common.REPO)
  from configs import default as default_config
  from diffusion_jax.train import autoencoder as ae_stage
  from diffusion_jax.train import clip as clip_stage
  from diffusion_jax.train import diffusion as diffusion_stage

  config = default_config.get_config()
  tokenizer = clip_stage.make_tokenizer(config)
  text_cfg = clip_stage.model_config(config, tokenizer).text
  vae_cfg = ae_stage.model_config(config)
  factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
  unet_cfg = diffusion_stage.unet_config(config, vae_cfg.latent_channels, config.data.image_size // factor,
                                         text_cfg.hidden_size)
  return _random_pipeline(tokenizer, text_cfg, vae_cfg, unet_cfg, diffusion_stage.scheduler_config(config)), \
      "random weights, configs/default.py sizes"


def sd15_pipeline():
  """Stable Diffusion 1.5's networks with random weights (and a small word-level tokenizer)."""
  from diffusion_jax.diffusion.schedules import SchedulerConfig
  from diffusion_jax.nn import autoencoder, text_encoder, unet
  from diffusion_jax.tokenizer import CLIPTokenizer

  tokenizer = CLIPTokenizer.from_words(PROMPT.split(), max_length=77)
  text_cfg = dataclasses.replace(text_encoder.SD15_TEXT, eos_token_id=tokenizer.eos_token_id)
  return _random_pipeline(tokenizer, text_cfg, autoencoder.SD, unet.SD15, SchedulerConfig()), \
      "random weights, SD 1.5 sizes"


def _random_pipeline(tokenizer, text_cfg, vae_cfg, unet_cfg, scheduler):
  """Random weights; the pipeline's default image size is the UNet's sample_size times the VAE factor."""
  import jax
  import jax.numpy as jnp

  from diffusion_jax import Pipeline, hardware
  from diffusion_jax.nn.autoencoder import AutoencoderKL
  from diffusion_jax.nn.text_encoder import TextEncoder
  from diffusion_jax.nn.unet import UNet

  # As Pipeline.from_pretrained chooses them for the devices.
  vae_cfg, unet_cfg = (hardware.configure(c, jax.devices(), jnp.float32, force=True) for c in (vae_cfg, unet_cfg))

  keys = jax.random.split(jax.random.key(0), 3)
  text, vae, net = TextEncoder(text_cfg), AutoencoderKL(vae_cfg), UNet(unet_cfg)
  factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
  s = 2 ** (len(unet_cfg.block_out_channels) - 1)
  params = {
      "text_encoder": random_params(text, keys[0], jnp.zeros((1, tokenizer.max_length), jnp.int32)),
      "vae": random_params(vae, keys[1], jnp.zeros((1, factor, factor, vae_cfg.in_channels)),
                           sample_posterior=False),
      "unet": random_params(net, keys[2], jnp.zeros((1, s, s, unet_cfg.in_channels)), jnp.zeros((1,)),
                            jnp.zeros((1, 1, text_cfg.hidden_size))),
  }
  configs = {"text_encoder": text_cfg, "vae": vae_cfg, "unet": unet_cfg}
  return Pipeline(tokenizer, text, vae, net, params, scheduler, configs)


# ---------------------------------------------------------------------------------------------- worker
def worker(setting: str, run_dir: str | None, num_images: int, repeats: int, cache_dir: str, measure: bool):
  import jax
  import jax.numpy as jnp
  import numpy as np

  import diffusion_jax as dj
  from diffusion_jax import program_cache
  assert {program_cache.SAVE_EVENT, program_cache.LOAD_EVENT} <= set(COMPILE_EVENTS)

  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  durations: dict[str, float] = {}

  def listener(event, duration, **kwargs):
    if event in REPORTED_EVENTS:
      durations[event] = durations.get(event, 0.0) + duration

  pipe, source = default_pipeline(run_dir) if setting == "default" else sd15_pipeline()
  pipe.program_cache_dir = os.path.join(cache_dir, "programs")  # as sample.py sets it
  jax.monitoring.register_event_duration_secs_listener(listener)
  prompts = [PROMPT] * num_images

  def generate():
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=7.5, sampler="dpmpp_2m", seed=0)

  start = time.perf_counter()
  images = generate()
  out = {"setting": setting, "weights": source, "num_images": num_images, "image_shape": list(images.shape[1:]),
         "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
         "first_call_s": time.perf_counter() - start,
         "compile_s": sum(v for k, v in durations.items() if k in COMPILE_EVENTS),
         "compile_events_s": {k.rsplit("/", 1)[-1]: round(v, 3) for k, v in durations.items()}}
  if not measure:
    out["peak_rss_gb"] = common.peak_rss_gb()
    return out

  # The bare UNet: as many calls as the sampler makes, on the same doubled (guided) batch, chained.
  cfg = pipe.configs["unet"]
  size = images.shape[1] // pipe.latent_factor
  x = jax.random.normal(jax.random.key(1), (2 * num_images, size, size, cfg.in_channels), jnp.float32)
  context = jnp.concatenate([pipe.encode_prompt([""] * num_images), pipe.encode_prompt(prompts)])
  t = jnp.full((2 * num_images,), 500.0, jnp.float32)
  unet = dj.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))  # as the pipeline compiles its loop

  def bare_unet():
    y = x
    for _ in range(STEPS):
      y = unet(pipe.params["unet"], y, t, context)
    y.block_until_ready()

  unet(pipe.params["unet"], x, t, context).block_until_ready()  # compiles
  # Generations and bare UNet loops alternate, so that a change in the machine's load hits both alike.
  totals, bares = [], []
  for _ in range(max(repeats - 1, 1)):
    for fn, times in ((generate, totals), (bare_unet, bares)):
      start = time.perf_counter()
      fn()
      times.append((time.perf_counter() - start) * 1e3)
  out["total_ms"] = float(np.median(totals))
  out["unet_calls"] = f"{STEPS} x batch {2 * num_images}"
  out["unet_ms"] = float(np.median(bares))
  out["overhead"] = round(out["total_ms"] / out["unet_ms"] - 1, 4)
  # Each generation against the bare loop that ran right after it: a change in the machine's load
  # between pairs cancels out, where a burst that lands on some generations moves the medians apart.
  out["overhead_paired"] = round(float(np.median(np.divide(totals, bares))) - 1, 4)
  out["total_ms_each"], out["unet_ms_each"] = [round(t, 2) for t in totals], [round(t, 2) for t in bares]
  out["peak_rss_gb"] = common.peak_rss_gb()
  return out


# ---------------------------------------------------------------------------------------------- parent
def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", default="default,sd15", help="comma-separated: default, sd15")
  parser.add_argument("--run", default=os.path.join(common.REPO, "runs", "default"),
                      help="training run for the default setting (random weights if missing)")
  parser.add_argument("--num-images", default="default:8,sd15:1", help="images per generation, per setting")
  parser.add_argument("--repeats", default="default:22,sd15:2",
                      help="generations in the first process, per setting (the first one compiles)")
  parser.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: a fresh temp dir)")
  parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "sample.json"))
  parser.add_argument("--huge-pages", action="store_true", help="run the workers as sample.py --huge-pages does")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  counts = dict(item.split(":") for item in args.num_images.split(","))
  repeats = dict(item.split(":") for item in args.repeats.split(","))

  if args.worker:
    from diffusion_jax import host_memory
    if args.huge_pages:
      host_memory.reexec_with_huge_pages()  # as sample.py --huge-pages does
    return common.emit(worker(args.worker, args.run, int(counts[args.worker]), int(repeats[args.worker]),
                              args.cache_dir, args.measure))

  result = {"machine": {"cores": os.cpu_count(), "load_average_start": common.load_average()},
            "steps": STEPS, "sampler": "dpmpp_2m", "guidance_scale": 7.5}
  for setting in [s for s in args.settings.split(",") if s]:
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix=f"xla-cache-{setting}-")
    if args.cache_dir is None:
      shutil.rmtree(cache_dir, ignore_errors=True)
    runs = []
    for measure in (True, False):  # cold cache (and the timings), then warm cache
      print(f"# {setting}: {'first' if measure else 'second'} process", file=sys.stderr, flush=True)
      argv = [sys.executable, os.path.abspath(__file__), "--worker", setting, "--run", args.run,
              "--num-images", args.num_images, "--repeats", args.repeats, "--cache-dir", cache_dir,
              *(["--huge-pages"] if args.huge_pages else [])]
      runs.append(common.run_worker(argv + (["--measure"] if measure else [])))
    first, second = runs
    entry = {"first_process": first, "second_process": second}
    if first.get("compile_s") and second.get("compile_s") is not None:
      entry["second_over_first_compile"] = round(second["compile_s"] / first["compile_s"], 3)
    result[setting] = entry
    if args.cache_dir is None:
      shutil.rmtree(cache_dir, ignore_errors=True)
  result["machine"]["load_average_end"] = common.load_average()
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
