"""train.py end to end with configs/smoke.py, in subprocesses.

One test (so that a parallel test runner keeps it in one process): a full run; the same command
again (a no-op); the result loaded with Pipeline.from_pretrained; then a second run killed with
SIGKILL six times (at random moments and during checkpoint saves) and restarted each time, finishing
with exactly the parameters of the uninterrupted run. Restarts reuse the first run's compilation cache.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffusion_jax.convert.safetensors_io import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
OFFSETS = {"autoencoder": 0, "clip": 24, "diffusion": 48}  # global step before each stage (smoke)


def command(workdir, tmp_path, *flags):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "smoke.py"),
          "--workdir", str(workdir), "--config.data.data_dir", str(tmp_path / "data"),
          "--config.compilation_cache_dir", str(tmp_path / "xla"), *flags]


def run(workdir, tmp_path, *flags):
  proc = subprocess.run(command(workdir, tmp_path, *flags), capture_output=True, text=True, cwd=ROOT,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def checkpoint_steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def progress(log) -> int:
  """The global step that the progress bars in a run's stderr have reached (-1: none yet)."""
  bars = re.findall(r"(autoencoder|clip|diffusion):\s+\d+%\|[^|]*\|\s*(\d+)/", log.read_text())
  return OFFSETS[bars[-1][0]] + int(bars[-1][1]) if bars else -1


def assert_resumed_from(stderr: str, step: int) -> None:
  """The first stage a run started began at global step `step` (its newest complete checkpoint)."""
  started = re.findall(r"stage (\w+): state ready at step (\d+)", stderr)
  if started:  # (a run killed during start-up gets no further)
    name, local = started[0]
    assert OFFSETS[name] + int(local) == step, (started, step)


def temporary_checkpoints(workdir):
  """Checkpoint directories still being written (orbax renames them when the save completes)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return [d for d in os.listdir(ckpt) if "tmp" in d] if os.path.isdir(ckpt) else []


def read_model(workdir):
  """{component/key: array} of every safetensors file of the exported model."""
  out = {}
  model = os.path.join(workdir, "model")
  for component in sorted(os.listdir(model)):
    folder = os.path.join(model, component)
    if not os.path.isdir(folder):
      continue
    for name in os.listdir(folder):
      if name.endswith(".safetensors"):
        f = SafetensorsFile(os.path.join(folder, name))
        out.update({f"{component}/{k}": np.array(f.get_tensor(k)) for k in f.keys()})
        f.close()
  return out


@pytest.mark.slow
def test_smoke_run_resume_pipeline_and_sigkill(tmp_path):
  import diffusion_jax as dj

  a = tmp_path / "a"
  first = run(a, tmp_path)
  results = json.loads((a / "results.json").read_text())
  assert list(results) == ["autoencoder", "clip", "diffusion"]
  assert "psnr" in results["autoencoder"]["final"] and "zero_shot_accuracy" in results["clip"]["final"]
  assert "single/color" in results["diffusion"]["final"]
  assert checkpoint_steps(a)[-1] == 78  # 24 + 24 + 30 steps, numbered across the stages
  metrics = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
  assert {m["stage"] for m in metrics} == {"autoencoder", "clip", "diffusion"}
  assert all(np.isfinite(m["loss"]) for m in metrics if m["kind"] == "train")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(a / "tensorboard"))
  pngs = sorted(os.listdir(a / "samples"))
  assert any(p.startswith("autoencoder_reconstructions") for p in pngs)
  assert any(p.startswith("diffusion_samples") for p in pngs)
  assert (a / "model" / "model_index.json").exists()

  # The same command again: every stage is finished, nothing is trained or written.
  before = checkpoint_steps(a)
  start = time.perf_counter()
  again = run(a, tmp_path)
  assert again.stderr.count("already finished") == 3, again.stderr[-2000:]
  assert checkpoint_steps(a) == before and time.perf_counter() - start < 60

  # The run directory loads as a pipeline (its model/ export) and draws images.
  pipe = dj.Pipeline.from_pretrained(str(a))
  images = pipe("a large red circle on the left", num_inference_steps=3, guidance_scale=2.0, seed=1)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8

  # A second run, killed with SIGKILL seven times and restarted with the same command each time:
  # once during start-up, three times at random training steps (plus a random fraction of a second,
  # which lands in steps, evaluations, saves or exports), three times just as a checkpoint save has
  # begun. Each restart must resume from the newest complete checkpoint, and the last one must end on
  # exactly the parameters of the uninterrupted run.
  b = tmp_path / "b"
  rng = random.Random(0)
  targets = sorted(rng.sample(range(2, 76), 6))  # global steps, spread over the three stages
  plan = [("startup", None)] + [("step" if i % 2 == 0 else "save", t) for i, t in enumerate(targets)]
  during_save = 0
  for attempt, (kind, target) in enumerate(plan):
    resume_from = (checkpoint_steps(b) or [0])[-1]
    leftover = set(temporary_checkpoints(b))
    log = tmp_path / f"attempt{attempt}.log"
    with open(log, "w") as stderr:
      proc = subprocess.Popen(command(b, tmp_path), stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)
    if kind == "startup":
      kill_at = time.monotonic() + rng.uniform(0.5, 5.0)
      moment = lambda: time.monotonic() > kill_at
    elif kind == "step":
      delay = rng.uniform(0.0, 1.5)
      reached = []
      def moment():
        if not reached and progress(log) >= target:
          reached.append(time.monotonic())
        return bool(reached) and time.monotonic() > reached[0] + delay
    else:
      moment = lambda: any(int(d.split(".")[0]) >= target for d in set(temporary_checkpoints(b)) - leftover)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None and not moment():
      time.sleep(0.01)
    assert proc.poll() is None, f"attempt {attempt} ({kind}) ended before it could be killed:\n" + log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    during_save += bool(set(temporary_checkpoints(b)) - leftover)  # a save was cut off half-written
    assert_resumed_from(log.read_text(), resume_from)
  assert during_save >= 3, f"only {during_save} kills landed during a checkpoint save"
  resume_from = checkpoint_steps(b)[-1]
  assert_resumed_from(run(b, tmp_path).stderr, resume_from)

  final_a, final_b = read_model(a), read_model(b)
  assert final_a.keys() == final_b.keys() and len(final_a) > 50
  different = [k for k in final_a if not np.array_equal(final_a[k], final_b[k])]
  assert not different, different[:10]
  del first
