"""Traced programs on disk (jax.export): found again without tracing, never found for a different program."""
import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from diffusion_jax import program_cache
from diffusion_jax.program_cache import NotDescribable, ProgramCache, describe
from tests.sd_fixtures import build_sd_directory


class EventCounter:
  """Counts jax.monitoring duration events by name while in use."""

  def __init__(self):
    self.counts = {}

  def __call__(self, event, duration, **kwargs):
    self.counts[event] = self.counts.get(event, 0) + 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def traced_counter():
  """`new_function()` makes a new function object (as each process would have) each time; `traces`
  counts how often JAX traced any of them (JAX reuses a trace only for the same function object)."""
  traces = []

  def new_function():
    def f(x, y):
      traces.append(1)
      return jnp.sin(x) @ y + 1.0
    return f

  return new_function, traces


def entries(directory):
  return sorted(n for n in os.listdir(directory) if n.endswith(program_cache.SUFFIX)) if os.path.isdir(directory) else []


def test_a_new_cache_loads_the_program_without_tracing_it(tmp_path):
  new_function, traces = traced_counter()
  x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((3, 4))
  first = ProgramCache(tmp_path).wrap(jax.jit(new_function()), ("matmul", 1))(x, y)
  assert len(traces) == 1 and len(entries(tmp_path)) == 1
  with EventCounter() as events:
    again = ProgramCache(tmp_path).wrap(jax.jit(new_function()), ("matmul", 1))(x, y)  # as a new process would
  assert len(traces) == 1, "the stored program was traced again"
  assert events.counts.get(program_cache.LOAD_EVENT) == 1
  np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
  np.testing.assert_allclose(np.asarray(again), np.sin(np.asarray(x)) @ np.ones((3, 4)) + 1.0, rtol=1e-6)


def test_the_key_covers_shapes_dtypes_description_and_jax_config(tmp_path):
  new_function, traces = traced_counter()
  x, y = jnp.ones((2, 3)), jnp.ones((3, 4))

  def run(description, *args):
    return ProgramCache(tmp_path).wrap(jax.jit(new_function()), description)(*args)

  run(("matmul", 1), x, y)
  run(("matmul", 1), jnp.ones((5, 3)), y)  # another shape
  run(("matmul", 1), x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))  # another dtype
  run(("matmul", 2), x, y)  # another description
  with jax.default_matmul_precision("highest"):  # a JAX setting that changes the traced program
    run(("matmul", 1), x, y)
  assert len(traces) == 5 and len(entries(tmp_path)) == 5
  run(("matmul", 1), x, y)  # each of them is found again
  with jax.default_matmul_precision("highest"):
    run(("matmul", 1), x, y)
  assert len(traces) == 5


def test_the_key_covers_the_modules_implementation_choices(tmp_path):
  from diffusion_jax.nn.unet import TINY, UNet
  new_function, traces = traced_counter()
  x, y = jnp.ones((2, 3)), jnp.ones((3, 4))
  for attention in ("xla", "cpu_tiles", "xla"):
    unet = UNet(dataclasses.replace(TINY, attention=attention))
    ProgramCache(tmp_path).wrap(jax.jit(new_function()), ("p", unet))(x, y)
  assert len(traces) == 2 and len(entries(tmp_path)) == 2


def test_entries_are_data_not_code(tmp_path):
  new_function, _ = traced_counter()
  ProgramCache(tmp_path).wrap(jax.jit(new_function()), "p")(jnp.ones((2, 3)), jnp.ones((3, 4)))
  (path,) = entries(tmp_path)
  with open(tmp_path / path, "rb") as f:
    payload = f.read()
  assert not payload.startswith(b"\x80")  # no pickle stream
  assert export.deserialize(bytearray(payload)).in_avals[0].shape == (2, 3)


def test_an_unreadable_entry_is_compiled_again_and_replaced(tmp_path):
  new_function, traces = traced_counter()
  x, y = jnp.ones((2, 3)), jnp.ones((3, 4))
  expected = np.asarray(ProgramCache(tmp_path).wrap(jax.jit(new_function()), "p")(x, y))
  (path,) = entries(tmp_path)
  with open(tmp_path / path, "r+b") as file:
    file.truncate(100)  # as a crash of another writer might have left it (writes are atomic here)
  with pytest.warns(UserWarning, match="unreadable program"):
    out = ProgramCache(tmp_path).wrap(jax.jit(new_function()), "p")(x, y)
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert len(traces) == 2 and os.path.getsize(tmp_path / path) > 100
  ProgramCache(tmp_path).wrap(jax.jit(new_function()), "p")(x, y)
  assert len(traces) == 2


def test_an_unwritable_directory_warns_and_still_runs(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  new_function, _ = traced_counter()
  with pytest.warns(UserWarning, match="not keeping compiled programs"):
    out = ProgramCache(blocker / "programs").wrap(jax.jit(new_function()), "p")(jnp.ones((2, 3)), jnp.ones((3, 4)))
  assert out.shape == (2, 4)


def test_describe():
  from diffusion_jax.diffusion.schedules import SchedulerConfig
  from diffusion_jax.nn.unet import UNet, UNetConfig

  big = np.zeros(5000, np.float32)
  changed = big.copy()
  changed[2500] = 1.0  # NumPy's repr would print both as [0. 0. ... 0.]
  assert describe(big) != describe(changed)
  assert describe(SchedulerConfig()) == describe(SchedulerConfig())
  assert describe(SchedulerConfig()) != describe(SchedulerConfig(prediction_type="v_prediction"))
  assert describe(jnp.bfloat16) == describe(np.dtype("bfloat16")) == describe(jnp.dtype(jnp.bfloat16))
  assert describe(UNet(UNetConfig())) == describe(UNet(UNetConfig(), name="unet"))
  assert describe(UNet(UNetConfig())) != describe(UNet(UNetConfig(), dtype=jnp.bfloat16))
  with pytest.raises(NotDescribable):
    describe(lambda x: x)  # code: what it does cannot be told from outside
  with pytest.raises(NotDescribable):
    describe(warnings.WarningMessage)  # a class from elsewhere


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  return build_sd_directory(str(tmp_path_factory.mktemp("sd1")), style="sd1")


@pytest.mark.parametrize("progress", [False, True])
def test_a_new_pipeline_loads_its_programs_and_makes_the_same_images(sd_dir, tmp_path, progress):
  import diffusion_jax as dj
  kwargs = dict(num_inference_steps=3, num_images=2, seed=1, output_type="np", progress=progress)
  plain = dj.Pipeline.from_pretrained(sd_dir)(["a cat"], **kwargs)
  first = dj.Pipeline.from_pretrained(sd_dir)
  first.program_cache_dir = str(tmp_path)
  stored = first(["a cat"], **kwargs)
  assert len(entries(tmp_path)) == (3 if progress else 1)  # begin / advance / finish, or the whole loop
  second = dj.Pipeline.from_pretrained(sd_dir)  # as in a new process
  second.program_cache_dir = str(tmp_path)
  with EventCounter() as events:
    loaded = second(["a cat"], **kwargs)
  assert events.counts.get(program_cache.LOAD_EVENT) == (3 if progress else 1)
  assert events.counts.get(program_cache.SAVE_EVENT) is None
  np.testing.assert_array_equal(stored, plain)
  np.testing.assert_array_equal(loaded, plain)
  # Another static setting (the sampler) is another program.
  second(["a cat"], sampler="euler", **kwargs)
  assert len(entries(tmp_path)) == (6 if progress else 2)


def test_a_pipeline_with_a_module_from_elsewhere_is_not_cached(sd_dir, tmp_path):
  import diffusion_jax as dj
  from diffusion_jax.nn.unet import UNet

  class MyUNet(UNet):  # its code is not in the package's source, so no key can vouch for it
    pass

  pipe = dj.Pipeline.from_pretrained(sd_dir)
  pipe.unet = MyUNet(pipe.unet.config, dtype=pipe.unet.dtype, param_dtype=pipe.unet.param_dtype)
  pipe.program_cache_dir = str(tmp_path)
  out = pipe("a cat", num_inference_steps=2, output_type="np")
  assert out.shape == (1, 16, 16, 3) and entries(tmp_path) == []


def test_multi_host_runs_compile_as_usual(tmp_path, monkeypatch):
  jitted = jax.jit(lambda x: x + 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert ProgramCache(tmp_path).wrap(jitted, "p") is jitted


def test_a_program_calling_the_cpu_attention_kernel_loads_in_a_new_process(sd_dir, tmp_path):
  # The stored executable calls the kernel by name: a new process must register it before running it.
  import subprocess
  import sys
  import textwrap
  code = textwrap.dedent(f"""
    import jax, numpy as np
    import diffusion_jax as dj
    from diffusion_jax import program_cache
    from diffusion_jax.nn import cpu_attention
    loads = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: loads.append(event) if event == program_cache.LOAD_EVENT else None)
    pipe = dj.Pipeline.from_pretrained({str(sd_dir)!r})
    pipe.program_cache_dir = {str(tmp_path / "programs")!r}
    images = pipe(["a cat"], num_inference_steps=2, num_images=1, seed=1, output_type="np")
    print(cpu_attention.available(), len(loads), float(np.asarray(images, np.float64).sum()))
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "DIFFUSION_JAX_CACHE": str(tmp_path / "cache")}
  runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
          for _ in range(2)]
  for run in runs:
    assert run.returncode == 0, run.stderr[-3000:]
  first, second = (run.stdout.split() for run in runs)
  assert first[:2] == ["True", "0"] and second[:2] == ["True", "1"]  # compiled and stored, then loaded
  assert first[2] == second[2]  # the same image
