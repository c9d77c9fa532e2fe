"""Loading speed: a Stable-Diffusion-1.5-shaped diffusers directory, ours against diffusers.

  python benchmarks/load.py                        # builds /tmp/dj-load-sd15 once, then 5 rounds
  python benchmarks/load.py --rounds 7 --dir /data/sd15-random --out benchmarks/results/load.json

The directory holds random weights with SD 1.5's shapes, written by diffusers/transformers with
`save_pretrained(safe_serialization=True)`: the UNet (860M, UNet2DConditionModel's default config),
the VAE (SD's AutoencoderKL config), the CLIP ViT-L text tower, a small word-level tokenizer and a
PNDM scheduler config. Each round runs every loader once, each in a fresh subprocess, in alternating
order; a worker times only the load call (imports excluded):

  - load_directory: `diffusion_jax.convert.diffusers.load_directory(dir)`, parameters on the device;
  - pipeline: `diffusion_jax.Pipeline.from_pretrained(dir)`;
  - diffusers: `diffusers.StableDiffusionPipeline.from_pretrained(dir)` (float32, CPU).

The medians of wall and CPU time (all threads) and their ratios to diffusers are printed as JSON and
written to --out. The machine may be busy: the ratio within one run is the figure to compare, and
on a crowded machine the CPU-time ratio is the steadier one. Parameter shapes come from the loader's
shape cache after the first round (diffusion_jax.convert.diffusers.abstract_params); --cold-shapes
gives every round an empty one.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LOADERS = ("load_directory", "pipeline", "diffusers")
WORDS = "a photo of an astronaut riding a horse on mars large red circle blue square".split()


def build_directory(path: str) -> None:
  """Writes the random SD 1.5-shaped pipeline with diffusers' own writers (once; reused if complete)."""
  if os.path.exists(os.path.join(path, "model_index.json")):
    return
  import diffusers
  import torch
  import transformers

  from diffusion_jax.tokenizer import CLIPTokenizer

  os.makedirs(path, exist_ok=True)
  with tempfile.TemporaryDirectory() as tokenizer_src:
    CLIPTokenizer.from_words(WORDS).save_pretrained(tokenizer_src)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_src)
  torch.manual_seed(0)
  text_config = transformers.CLIPTextConfig(  # CLIP ViT-L/14's text tower, as in SD 1.x
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
      max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  text_encoder = transformers.CLIPTextModel(text_config).eval()
  unet = diffusers.UNet2DConditionModel().eval()  # the default config is SD 1.5's
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
      layers_per_block=2, norm_num_groups=32, sample_size=512).eval()
  scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True)
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
  tmp = path + ".partial"
  pipe.save_pretrained(tmp, safe_serialization=True)
  for name in os.listdir(tmp):
    os.replace(os.path.join(tmp, name), os.path.join(path, name))
  os.rmdir(tmp)


def _cpu_s() -> float:
  """CPU time of this process so far, all threads (steadier than wall time on a shared machine)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def worker(loader: str, path: str) -> None:
  """Times one load in this process (imports excluded) and emits the result."""
  cpu_start = 0.0
  if loader == "diffusers":
    import diffusers
    import torch
    torch.set_grad_enabled(False)
    start, cpu_start = time.perf_counter(), _cpu_s()
    diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    load_s = time.perf_counter() - start
  else:
    import jax

    import diffusion_jax  # noqa: F401
    from diffusion_jax.convert import diffusers as dconv
    start, cpu_start = time.perf_counter(), _cpu_s()
    if loader == "load_directory":
      loaded = dconv.load_directory(path)
      jax.block_until_ready(loaded.params)
    else:
      pipe = diffusion_jax.Pipeline.from_pretrained(path)
      jax.block_until_ready(pipe.params)
    load_s = time.perf_counter() - start
  common.emit({"loader": loader, "load_s": round(load_s, 3), "cpu_s": round(_cpu_s() - cpu_start, 3),
               "peak_rss_gb": round(common.peak_rss_gb(), 2)})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default="/tmp/dj-load-sd15", help="where the random SD 1.5 directory is (built once)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated: " + ", ".join(LOADERS))
  parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "load.json"))
  parser.add_argument("--cold-shapes", action="store_true", help="trace parameter shapes in every round")
  parser.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker, args.dir)
  build_directory(args.dir)
  loaders = args.loaders.split(",")
  times: dict[str, list[float]] = {name: [] for name in loaders}
  peaks: dict[str, list[float]] = {name: [] for name in loaders}
  cpu: dict[str, list[float]] = {name: [] for name in loaders}
  errors = []
  for r in range(args.rounds):
    order = loaders if r % 2 == 0 else loaders[::-1]  # alternating, so that neither always goes first
    for name in order:
      env = {"JAX_PLATFORMS": "cpu"}
      with tempfile.TemporaryDirectory() as empty:
        if args.cold_shapes:
          env["DIFFUSION_JAX_SHAPE_CACHE"] = empty
        result = common.run_worker([sys.executable, os.path.abspath(__file__), "--worker", name, "--dir", args.dir],
                                   env=env, timeout=900)
      if "error" in result:
        errors.append({"loader": name, **result})
        continue
      times[name].append(result["load_s"])
      cpu[name].append(result["cpu_s"])
      peaks[name].append(result["peak_rss_gb"])
  medians = {name: round(statistics.median(t), 3) for name, t in times.items() if t}
  cpu_medians = {name: round(statistics.median(t), 3) for name, t in cpu.items() if t}
  result = {"directory": args.dir, "rounds": args.rounds, "cold_shapes": args.cold_shapes, "median_load_s": medians, "median_cpu_s": cpu_medians,
            "all_load_s": times, "all_cpu_s": cpu, "peak_rss_gb": {n: max(p) for n, p in peaks.items() if p},
            "load_average": common.load_average()}
  if "diffusers" in medians:
    result["ratio_to_diffusers"] = {n: round(m / medians["diffusers"], 3) for n, m in medians.items()
                                    if n != "diffusers"}
    result["cpu_ratio_to_diffusers"] = {n: round(m / cpu_medians["diffusers"], 3) for n, m in cpu_medians.items()
                                        if n != "diffusers"}
  if errors:
    result["errors"] = errors
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
