"""train.py end to end with configs/smoke.py, in subprocesses.

One test (so that a parallel test runner keeps it in one process): a full run; the same command
again (a no-op); the result loaded with Pipeline.from_pretrained; then a second run killed with
SIGKILL while it trains or saves, restarted, and finishing with exactly the parameters of the
uninterrupted run. The second run reuses the first one's compilation cache.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from diffusion_jax.convert.safetensors_io import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


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

  # A second run, killed with SIGKILL during the diffusion stage (as soon as its step-68 checkpoint
  # starts being written), then restarted with the same command.
  b = tmp_path / "b"
  proc = subprocess.Popen(command(b, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      ckpt = b / "checkpoints"
      if ckpt.is_dir() and any(d.startswith("68") for d in os.listdir(ckpt)):
        break
      time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = checkpoint_steps(b)
  assert killed_at and 48 < killed_at[-1] < 78, killed_at
  resumed = run(b, tmp_path)
  assert resumed.stderr.count("already finished") == 2, resumed.stderr[-2000:]

  final_a, final_b = read_model(a), read_model(b)
  assert final_a.keys() == final_b.keys() and len(final_a) > 50
  different = [k for k in final_a if not np.array_equal(final_a[k], final_b[k])]
  assert not different, different[:10]
  del first
