"""Configuration checks before compiling, the configs themselves, and stopping on non-finite steps."""
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax.train import validate
from tests.train_helpers import ROOT, default_config

from configs import sd15, sd21, smoke  # noqa: E402  (ROOT is on sys.path via train_helpers)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c.autoencoder.update(learning_rate=-1.0), "config.autoencoder.learning_rate must be positive"),
    (lambda c: c.clip.update(learning_rate=0.0), "config.clip.learning_rate must be positive"),
    (lambda c: c.update(stages=("autoencoder", "painting")), "unknown stage 'painting'"),
    (lambda c: c.diffusion.sample.update(sampler="plms"), "unknown sampler 'plms'"),
    (lambda c: c.diffusion.update(batch_size=30, microbatches=4), "not divisible by microbatches"),
    (lambda c: c.update(stages=("diffusion",)), "needs a VAE and a text encoder"),
    (lambda c: c.diffusion.update(caption_dropout=1.5), "caption_dropout must be in [0, 1)"),
    (lambda c: c.mesh.update(tensor=2), "unknown mesh axis 'tensor'"),
    (lambda c: c.update(dtype="float64"), "config.dtype must be one of"),
    (lambda c: c.clip.update(xla_scheduler="fast"), "config.clip.xla_scheduler must be one of"),
])
def test_invalid_configs_are_rejected(mutate, fragment):
  config = default_config.get_config()
  mutate(config)
  with pytest.raises(validate.ConfigError) as err:
    validate.check(config)
  assert fragment in str(err.value) and "\n" not in str(err.value)


def test_batch_must_split_over_devices():
  config = default_config.get_config()
  validate.check(config)
  validate.check_devices(config, 1, 1)
  config.autoencoder.batch_size = 18
  with pytest.raises(validate.ConfigError, match="autoencoder.batch_size 18 .* not divisible by the 4 devices"):
    validate.check_devices(config, 4, 1)


def test_configs_load_and_validate():
  for module in (default_config, smoke):
    validate.check(module.get_config())
  for module in (sd15, sd21):
    config = module.get_config()
    assert config.stages == ("diffusion",) and config.dtype == "bfloat16"
    assert config.mesh.fsdp > 1 and config.diffusion.unet.remat != "none"
    with pytest.raises(validate.ConfigError, match="set config.diffusion.init_from"):
      validate.check(config)  # the SD directory must be given on the command line


def _train(tmp_path, *flags, timeout=300):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "smoke.py"),
       "--workdir", str(tmp_path / "run"), "--config.data.data_dir", str(tmp_path / "data"),
       "--config.compilation_cache_dir", "", *flags],
      capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("flag,fragment", [
    ("--config.autoencoder.learning_rate=-0.1", "learning_rate must be positive"),
    ("--config.diffusion.sample.sampler=plms", "unknown sampler 'plms'"),
    ("--config.stages=('autoencoder', 'upscaler')", "unknown stage 'upscaler'"),
])
def test_train_script_exits_before_compiling(tmp_path, flag, fragment):
  start = time.perf_counter()
  proc = _train(tmp_path, flag, timeout=120)
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("train.py: error:") and fragment in lines[0], proc.stderr
  assert not (tmp_path / "run").exists()  # nothing was written, nothing compiled
  assert time.perf_counter() - start < 60


def test_nonfinite_run_stops_and_keeps_the_checkpoint_before_the_fault(tmp_path):
  """NaN inputs from stage step 10 on: the run stops after 3 such steps, the step-8 checkpoint stays."""
  proc = _train(tmp_path, "--config.stages=('autoencoder',)", "--config.debug.nan_stage=autoencoder",
                "--config.debug.nan_from_step=9", "--config.debug.nan_steps=100",
                "--config.max_consecutive_nonfinite=3")
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("train.py: error: stage autoencoder: loss or gradients not finite for 3 consecutive")
  assert "(stage steps 10-12)" in last and "the checkpoint at step 8 is kept" in last, last
  workdir = tmp_path / "run"
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == 8
  from diffusion_jax.checkpoint import Checkpointer
  with Checkpointer.for_workdir(str(workdir)) as ckpt:
    restored = ckpt.restore(8, abstract_items={"vae": None, "vae_counters": None})
  assert int(restored.items["vae_counters"]["nonfinite_total"]) == 0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.items["vae"]))
  logged = (workdir / "metrics.jsonl").read_text()
  assert '"skipped": 3.0' in logged  # the stopping step logs the faults (steps 9-12: 10, 11, 12)
