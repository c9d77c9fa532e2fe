"""UNet forward and train-step timings, FLOPs and peak memory, beside diffusers (PyTorch) and diffusers' Flax UNet.

  python benchmarks/unet.py                                   # small and sd15, ours and both peers
  python benchmarks/unet.py --configs small --repeats 5 --out benchmarks/results/unet-small.json
  python benchmarks/unet.py --peer-torch-python /tmp/peer-torch/bin/python --peer-flax-python /tmp/peer-flax/bin/python

Each measurement (the matmul ceiling, and every (system, configuration) pair) runs in its own subprocess, in
this order: ceiling, then per configuration ours, diffusers-torch, diffusers-flax. The peers run the shared
timing script (/work/shared/bench/peer_unet.py) unchanged in their own virtual environments; a peer whose
python is missing is skipped with the reason recorded. Times are medians of `--repeats` calls after one
warm-up, as in the peers' script. Ratios are ours / peer (below 1: we are faster).

Ours runs twice: compiled as the pipeline and train.py compile theirs (the model's implementation choices
from `diffusion_jax.hardware` for these devices, the project's XLA options, donated train state), and as
a user's own `jax.jit` of `model.apply` and of an AdamW step (the same model, no compiler options, no
donation): "plain_jit" in the results, with configured / plain ratios.

With `--rounds N` the sequence (ours, then each peer) runs N times per configuration, so every peer
figure has one of ours measured minutes from it; the entry then holds each round and, per system, the
median of the rounds' times, and the ratios are medians of the per-round ratios. This shared machine's
speed drifts by 10-20% over minutes, which one round cannot tell from a real difference.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# The peers' UNet2DConditionModel configurations (peer_unet.py), in diffusers' config names.
SMALL = dict(sample_size=32, block_out_channels=(128, 256, 256), layers_per_block=2,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=512, attention_head_dim=8)
SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
CONFIGS = {"small": (SMALL, 8, 77), "sd15": (SD15, 1, 77)}  # (config, batch, context length)
# Rematerialisation used for our train step: SD 1.5 must fit in 16 GB; the small model fits without.
DEFAULT_REMAT = {"small": "none", "sd15": "transformer"}
# XLA scheduler of our train step (config.<stage>.xla_scheduler): SD 1.5's memory goal needs "memory".
DEFAULT_SCHEDULER = {"small": "default", "sd15": "memory"}
# Memory (GB) a worker needs; it waits for this much to be available (shared machine) or is skipped.
MEMORY_NEEDED_GB = {("ours", "small"): 6, ("ours", "sd15"): 16, ("torch", "small"): 4, ("torch", "sd15"): 17,
                    ("flax", "small"): 12, ("flax", "sd15"): 10}
PEER_SCRIPT = "/work/shared/bench/peer_unet.py"

# Runs peer_unet.py unchanged and adds the process's peak resident memory to its JSON line.
PEER_WRAPPER = r"""
import contextlib, io, json, runpy, sys
script = sys.argv[1]; sys.argv = sys.argv[1:]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    runpy.run_path(script, run_name="__main__")
lines = [l for l in buf.getvalue().splitlines() if l.startswith("{")]
out = json.loads(lines[-1])
with open("/proc/self/status") as f:
    out["peak_rss_gb"] = [int(l.split()[1]) * 1024 / 1e9 for l in f if l.startswith("VmHWM:")][0]
print("BENCH_RESULT " + json.dumps(out), flush=True)
"""


# ---------------------------------------------------------------------------------------------- workers
def worker_ceiling(repeats: int) -> dict:
  """fp32 2048^3 matmul in XLA: the GFLOP/s ceiling the UNet's figures are compared with."""
  import jax
  import jax.numpy as jnp
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  ms = common.median_ms(lambda: matmul(a, b).block_until_ready(), max(repeats, 10))
  return {"matmul_fp32_2048_ms": ms, "gflops_per_s": 2 * n ** 3 / ms / 1e6}


def reference_flops(fn, *args) -> float | None:
  """XLA's FLOP count of `fn` (a model built with attention "xla" and the feed-forward in one piece, so
  that attention is one softmax over [B, N, T, S]).

  XLA's cost analysis counts a loop body once, so the tiled attention and the chunked feed-forward
  (loops over tiles and chunks) would be under-counted; the count is taken on the lowered
  (unoptimised) program, which needs no compilation. The CPU attention kernel's and cuDNN's attention
  calls have no FLOP count either.
  """
  import jax
  return common.flops_of(jax.jit(fn).lower(*args))


def normal_params(abstract):
  """0.02 * normal for every leaf of `abstract`: one small program per distinct shape."""
  import jax

  @functools.lru_cache(maxsize=None)
  def make(shape, dtype):
    return jax.jit(lambda key: 0.02 * jax.random.normal(key, shape, dtype))

  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return jax.tree.unflatten(tree, [make(a.shape, a.dtype)(k) for a, k in zip(leaves, keys)])


def device_peak_gb() -> float | None:
  """Peak memory in use on an accelerator (None on the CPU, where peak_rss_gb says it)."""
  import jax
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  return stats["peak_bytes_in_use"] / 1e9 if stats and "peak_bytes_in_use" in stats else None


def worker_ours(name: str, repeats: int, remat: str, dtype_name: str, train: bool, batch: int | None = None,
                attention: str = "auto", plain: bool = False) -> dict:
  """Our UNet on one configuration: compile times, forward and train-step medians, FLOPs, peak memory.

  `plain`: compiled as a user's own `jax.jit` (no compiler options, no donation), FLOPs not counted.
  """
  import dataclasses
  import time

  import flax
  import jax
  import jax.numpy as jnp
  import optax
  from flax.linen import meta

  from diffusion_jax import xla_options
  from diffusion_jax.nn.unet import UNet, UNetConfig
  try:
    from diffusion_jax import hardware
  except ImportError:  # an older revision of the package (--pythonpath), whose modules choose for themselves
    hardware = None

  began = time.perf_counter()

  def progress(stage: str) -> None:  # on stderr, so that a run stopped part-way still says how far it got
    print(f"# {time.perf_counter() - began:7.1f} s  {stage}", file=sys.stderr, flush=True)

  progress(f"{jax.devices()[0]}, jax {jax.__version__}")

  ref_cfg, default_batch, seq = CONFIGS[name]
  batch = batch or default_batch
  dtype = jnp.dtype(dtype_name)
  if hardware is None:
    cfg = UNetConfig(**ref_cfg, remat=remat)
    counted = cfg
  else:  # the implementation choices the pipeline and training make for these devices (or `attention`)
    cfg = hardware.configure(UNetConfig(**ref_cfg, remat=remat), jax.devices(), dtype, force=True)
    cfg = cfg if attention == "auto" else dataclasses.replace(cfg, attention=attention)
    counted = dataclasses.replace(cfg, attention="xla", ff_chunk_elements=0)  # for reference_flops
  model, counted = UNet(cfg, dtype=dtype), UNet(counted, dtype=dtype)
  size = ref_cfg["sample_size"]
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 4), jnp.float32)
  t = jnp.arange(batch) * 7
  context = jax.random.normal(jax.random.key(2), (batch, seq, ref_cfg["cross_attention_dim"]), jnp.float32)

  def init(key):
    return meta.unbox(model.init(key, x, t, context)["params"])

  # Shape-first: programs are compiled from abstract shapes before the arrays they need exist, so the
  # compiler's memory never stacks on top of parameters and optimizer state (as train.py does).
  key = jax.random.key(0)
  abstract = jax.eval_shape(init, key)
  out = {"system": "ours", "size": name, "batch": batch, "jax": jax.__version__, "flax": flax.__version__,
         "devices": str(jax.devices()[0]), "compiled": "plain jax.jit" if plain else "configured",
         "choices": {f: getattr(cfg, f) for f in hardware.FIELDS} if hardware else None,
         "params": sum(v.size for v in jax.tree.leaves(abstract)), "dtype": dtype_name, "remat": remat,
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}

  def compile_timed(fn, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start

  def forward_of(m):
    return lambda p, x, t, c: m.apply({"params": p}, x, t, c)

  if plain:
    forward = jax.jit(forward_of(model))
  else:
    out["fwd_compiler_options"] = xla_options.compiler_options()
    forward = diffusion_jax_jit(forward_of(model))
  forward_c, out["fwd_compile_s"] = compile_timed(forward, abstract, x, t, context)
  progress(f"forward compiled in {out['fwd_compile_s']:.1f} s")
  out["peak_rss_gb_after_fwd_compile"] = common.peak_rss_gb()
  if not plain:
    out["fwd_flops_xla_loops_once"] = common.flops_of(forward_c)
    out["fwd_flops"] = reference_flops(forward_of(counted), abstract, x, t, context)
    progress("forward FLOPs counted")
  if jax.default_backend() == "cpu":
    params = jax.jit(init)(key)
  else:  # Flax's init (every initialiser in one program) is slow to compile; speed there ignores the values
    out["init"] = "0.02 * normal per leaf"
    params = normal_params(abstract)
  progress("parameters initialised")
  out["fwd_ms"] = common.median_ms(lambda: forward_c(params, x, t, context).block_until_ready(), repeats)
  progress(f"forward {out['fwd_ms']:.1f} ms")
  out["peak_rss_gb_after_fwd"] = common.peak_rss_gb()
  if not train:
    return out

  tx = optax.adamw(1e-4, weight_decay=0.01)  # torch.optim.AdamW's defaults, as the torch peer

  def train_step_of(m):
    def loss_fn(p):
      return jnp.mean((m.apply({"params": p}, x, t, context) - x) ** 2)

    def train_step(p, opt_state):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss
    return train_step

  abstract_state = (abstract, jax.eval_shape(tx.init, abstract))
  if plain:
    step = jax.jit(train_step_of(model))
  else:
    # Donating parameters and optimizer state lets XLA update them in place (no second copy); the
    # scheduler as train.py compiles its step.
    out["train_compiler_options"] = xla_options.compiler_options(DEFAULT_SCHEDULER[name])
    step = diffusion_jax_jit(train_step_of(model), scheduler=DEFAULT_SCHEDULER[name], donate_argnums=(0, 1))
  step_c, out["train_compile_s"] = compile_timed(step, *abstract_state)
  progress(f"train step compiled in {out['train_compile_s']:.1f} s")
  if not plain:
    out["train_flops_xla_loops_once"] = common.flops_of(step_c)
    out["train_flops"] = reference_flops(train_step_of(counted), *abstract_state)
    progress("train step FLOPs counted")
  out["peak_rss_gb_after_train_compile"] = common.peak_rss_gb()
  state = [params, jax.jit(tx.init)(params)]
  del params

  def train():
    p, s, loss = step_c(*state)
    loss.block_until_ready()
    state[0], state[1] = p, s

  out["train_ms"] = common.median_ms(train, repeats)
  progress(f"train step {out['train_ms']:.1f} ms")
  out["peak_rss_gb"] = common.peak_rss_gb()
  out["device_peak_gb"] = device_peak_gb()
  return out


def diffusion_jax_jit(fn, **kwargs):
  """`diffusion_jax.jit`, or for older revisions of the package (--pythonpath) jax.jit with their options."""
  import diffusion_jax
  if hasattr(diffusion_jax, "jit"):
    return diffusion_jax.jit(fn, **kwargs)
  import jax

  from diffusion_jax import xla_options
  return jax.jit(fn, compiler_options=xla_options.compiler_options(kwargs.pop("scheduler", "default")), **kwargs)


# ---------------------------------------------------------------------------------------------- parent
def guarded(system: str, name: str, run) -> dict:
  """Runs a worker once enough memory is free; records the load average it started under."""
  why = common.wait_for_memory(MEMORY_NEEDED_GB[(system, name)])
  if why:
    return {"skipped": why}
  load = common.load_average()
  return {**run(), "load_average_at_start": load}


def run_ours(args, name: str, plain: bool = False) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), "--worker", "plain" if plain else "ours", "--configs", name,
          "--repeats", str(args.repeats), "--remat", args.remat or DEFAULT_REMAT[name], "--dtype", args.dtype]
  if args.batch:
    argv += ["--batch", str(args.batch)]
  if args.no_train:
    argv.append("--no-train")
  argv += ["--attention", args.attention]
  env = {"XLA_FLAGS": args.xla_flags} if args.xla_flags is not None else {}
  if args.pythonpath:  # another revision of the package (e.g. a baseline), ahead of the installed one
    env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, os.environ.get("PYTHONPATH", "")])
  return common.run_worker(argv, env=env)


def run_peer(python: str, which: str, name: str, extra: list[str]) -> dict:
  if not python or not os.path.exists(python):
    return {"skipped": f"peer python {python!r} not found (set it up as /work/shared/bench/README.md says)"}
  if not os.path.exists(PEER_SCRIPT):
    return {"skipped": f"peer script {PEER_SCRIPT} not found"}
  return common.run_worker([python, "-c", PEER_WRAPPER, PEER_SCRIPT, which, name, *extra])


def ratios(ours: dict, peer: dict) -> dict:
  out = {}
  for key in ("fwd_ms", "train_ms"):
    a, b = ours.get(key), peer.get(key)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
      out[key.replace("_ms", "")] = round(a / b, 3)
  return out


def derived(ours: dict, ceiling: float | None) -> dict:
  """Achieved GFLOP/s and its fraction of the matmul ceiling."""
  out = {}
  for phase in ("fwd", "train"):
    flops, ms = ours.get(f"{phase}_flops"), ours.get(f"{phase}_ms")
    if flops and ms:
      out[f"{phase}_gflop"] = round(flops / 1e9, 1)
      out[f"{phase}_gflops_per_s"] = round(flops / ms / 1e6, 1)
      if ceiling:
        out[f"{phase}_fraction_of_ceiling"] = round(flops / ms / 1e6 / ceiling, 3)
  return out


def run_round(args, name: str, peers: list[str], ceiling_gflops, round_index: int) -> dict:
  """Ours, then each peer, on configuration `name`: one entry of the results."""
  label = f" (round {round_index + 1} of {args.rounds})" if args.rounds > 1 else ""
  print(f"# {name}: ours{label}", file=sys.stderr, flush=True)
  entry = {"ours": guarded("ours", name, lambda: run_ours(args, name))}
  entry["ours"].update(derived(entry["ours"], ceiling_gflops))
  if not args.no_plain:
    print(f"# {name}: ours, plain jax.jit{label}", file=sys.stderr, flush=True)
    plain = guarded("ours", name, lambda: run_ours(args, name, plain=True))
    entry["ours"]["plain_jit"] = plain
    entry["ours"]["configured_over_plain_jit"] = ratios(entry["ours"], plain)
  for peer in peers:
    print(f"# {name}: diffusers-{peer}{label}", file=sys.stderr, flush=True)
    python = args.peer_torch_python if peer == "torch" else args.peer_flax_python
    extra = []
    if args.no_train or (peer == "flax" and name == "sd15" and not args.flax_sd15_train):
      extra = ["--no-train"]
    entry[f"diffusers_{peer}"] = guarded(peer, name, lambda: run_peer(python, peer, name, extra))
    if extra and not args.no_train:
      entry[f"diffusers_{peer}"]["train_ms"] = None
      entry[f"diffusers_{peer}"]["train_skipped"] = ("needs more than 24 GiB (killed in the peers' README); "
                                                     "--flax-sd15-train runs it")
    entry[f"ours_over_{peer}"] = ratios(entry["ours"], entry[f"diffusers_{peer}"])
    entry[f"diffusers_{peer}"].update(derived({**entry[f"diffusers_{peer}"], "fwd_flops": entry["ours"].get("fwd_flops"),
                                               "train_flops": entry["ours"].get("train_flops")}, ceiling_gflops))
  return entry


def combine_rounds(rounds: list[dict], peers: list[str]) -> dict:
  """Per system the median time over rounds; per peer the median of the per-round ratios."""
  def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None
  out = {"rounds": rounds}
  for system in ["ours"] + [f"diffusers_{p}" for p in peers]:
    out[system] = {key: median([r[system].get(key) for r in rounds]) for key in ("fwd_ms", "train_ms")}
  for peer in peers:
    key = f"ours_over_{peer}"
    per_round = {phase: [r[key].get(phase) for r in rounds] for phase in ("fwd", "train")}
    out[key] = {phase: median(values) for phase, values in per_round.items() if median(values) is not None}
    out[key]["per_round"] = per_round
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="small,sd15", help="comma-separated: small, sd15")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up (median)")
  parser.add_argument("--rounds", type=int, default=1, help="run ours and the peers this many times, alternating")
  parser.add_argument("--peer-torch-python", default="/tmp/peer-torch/bin/python")
  parser.add_argument("--peer-flax-python", default="/tmp/peer-flax/bin/python")
  parser.add_argument("--peers", default="torch,flax", help="which peers to run ('' for none)")
  parser.add_argument("--flax-sd15-train", action="store_true",
                      help="also run diffusers-flax's SD 1.5 train step (needs more than 24 GiB)")
  parser.add_argument("--remat", default=None, help="our remat mode (default: per configuration)")
  parser.add_argument("--dtype", default="float32", help="our compute dtype")
  parser.add_argument("--xla-flags", default=None, help="XLA_FLAGS for our worker (default: inherited)")
  parser.add_argument("--no-train", action="store_true", help="forward only")
  parser.add_argument("--attention", default="auto",
                      help="our UNet's attention: 'auto' (diffusion_jax.hardware's choice for these devices), "
                           "'xla', 'cudnn', 'cpu_kernel' or 'cpu_tiles'")
  parser.add_argument("--no-plain", action="store_true", help="skip the plain jax.jit figures")
  parser.add_argument("--batch", type=int, default=None, help="our batch size (default: the configuration's)")
  parser.add_argument("--pythonpath", default=None, help="directory holding another diffusion_jax to time as ours")
  parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "unet.json"))
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  names = [n for n in args.configs.split(",") if n]
  if args.rounds < 1:
    parser.error("--rounds must be at least 1")

  if args.worker == "ceiling":
    return common.emit(worker_ceiling(args.repeats))
  if args.worker in ("ours", "plain"):
    from diffusion_jax import host_memory
    if args.worker == "ours":  # as `train.py --huge-pages`; the plain figure is what a user's own jit gets
      host_memory.reexec_with_huge_pages()
    return common.emit(worker_ours(names[0], args.repeats, args.remat or DEFAULT_REMAT[names[0]], args.dtype,
                                   not args.no_train, args.batch, args.attention, plain=args.worker == "plain"))

  peers = [p for p in args.peers.split(",") if p]
  result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_start": common.load_average()},
            "repeats": args.repeats, "peer_script": PEER_SCRIPT}
  ceiling = common.run_worker([sys.executable, os.path.abspath(__file__), "--worker", "ceiling",
                               "--repeats", str(args.repeats)])
  result["ceiling"] = ceiling
  ceiling_gflops = ceiling.get("gflops_per_s")
  for name in names:
    rounds = [run_round(args, name, peers, ceiling_gflops, r) for r in range(args.rounds)]
    result[name] = rounds[0] if len(rounds) == 1 else combine_rounds(rounds, peers)
  result["machine"]["load_average_end"] = common.load_average()
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
