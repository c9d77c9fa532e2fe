"""Trains the autoencoder, CLIP and the text-conditioned UNet, stage after stage, into one work directory.

  python train.py                                          # configs/default.py into runs/default
  python train.py --config configs/smoke.py --workdir /tmp/smoke
  python train.py --config configs/sd15.py --config.diffusion.init_from ./stable-diffusion-v1-5 --workdir runs/sd15

Running the same command again resumes: finished stages are skipped and the current one continues
from its newest checkpoint with the same data order and random draws. The result is exported to
<workdir>/model in diffusers format, for `python sample.py "..." --model <workdir>`.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: --huge-pages re-executes the process once
  import sys
  from diffusion_jax import host_memory
  if host_memory.FLAG in sys.argv[1:]:
    host_memory.reexec_with_huge_pages()

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "default.py"),
                                          "training configuration (a Python file with get_config())")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "run directory: checkpoints, metrics, samples, model/")
flags.DEFINE_bool("huge-pages", False, "CPU runs: restart once with glibc's transparent huge pages for XLA's "
                  "buffers (faster steps; diffusion_jax/host_memory.py)")


def fail(message: str, code: int = 2) -> None:
  print(f"train.py: error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO

  from diffusion_jax.train import validate
  try:
    validate.check(config)
  except validate.ConfigError as e:
    fail(str(e))

  import jax
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from diffusion_jax import parallel
  from diffusion_jax.train import data, loop, stages

  parallel.initialize_distributed()
  try:
    mesh = parallel.make_mesh(dict(config.mesh))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    validate.check_devices(config, shards, jax.process_count())
  except (ValueError, validate.ConfigError) as e:
    fail(str(e))

  t0 = time.perf_counter()
  data.source(config, "train"), data.source(config, "test")  # generates `shapes` on first use
  loop.log(f"data ready in {time.perf_counter() - t0:.1f}s")
  try:
    run = loop.Run.open(config, workdir, mesh)
  except loop.RunMismatchError as e:
    fail(str(e))

  for index, name in enumerate(config.stages):
    if run.finished(name):
      loop.log(f"stage {name}: already finished")
      continue
    t_stage = time.perf_counter()
    carried = run.carried(stages.carried_components(config, name))  # outputs of the stages before
    stage = stages.build(name, run, carried)  # model, loss, data, frozen networks, evaluation
    iterator = stage.make_iterator()
    loop.log(f"stage {name}: built in {time.perf_counter() - t_stage:.1f}s")
    state, compiled = loop.init_or_restore(run, stage, index, iterator)  # shardings, init or restore, jit
    loop.log(f"stage {name}: state ready at step {compiled.start} of {config[name].steps}")
    try:
      state = loop.train(run, stage, state, compiled, iterator, carried)  # steps, metrics, checkpoints
    except loop.NonFiniteError as e:
      run.close()
      fail(str(e), code=3)
    loop.finish(run, stage, state, time.perf_counter() - t_stage)  # final evaluation, export
    loop.log(f"stage {name}: done in {time.perf_counter() - t_stage:.0f}s")
  run.close()
  loop.log(f"run finished: {os.path.abspath(workdir)}")


if __name__ == "__main__":
  app.run(main)
