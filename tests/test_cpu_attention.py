"""The fused CPU attention kernel against the softmax formula: outputs, gradients, padding, fallbacks."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.nn import attention, cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel did not build here")


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def softmax_attention(q, k, v):  # [B, T, N, Dh], [B, S, N, Dh] in float64 NumPy: the formula itself
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnd->btnd", probs, v)


def qkv(b, t, s, n, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = 2 * jax.random.normal(ks[0], (b, t, n, d))
  k = 2 * jax.random.normal(ks[1], (b, s, n, d))
  v = jax.random.normal(ks[2], (b, s, n, d))
  weights = jax.random.normal(ks[3], (b, t, n, d))
  return q, k, v, weights


# (batch, queries, keys, heads, head dim): one block of 32 queries and several with a partial last one;
# head sizes that are multiples of 16 and ones padded to them (40, 80: SD 1.5's; 8); fewer keys than a
# row group; long key rows, which the forward pass takes in chunks of 256 (online softmax).
CASES = [(2, 64, 64, 2, 16), (1, 77, 77, 3, 40), (2, 33, 7, 2, 32), (1, 5, 3, 1, 8), (1, 40, 300, 2, 80),
         (1, 16, 9, 1, 160), (1, 35, 1500, 2, 24)]


@pytest.mark.parametrize("b,t,s,n,d", CASES)
def test_kernel_matches_softmax_formula(b, t, s, n, d):
  q, k, v, _ = qkv(b, t, s, n, d)
  got = jax.jit(cpu_attention.attention)(q, k, v)
  assert got.shape == q.shape and got.dtype == jnp.float32
  assert rel_l2(got, softmax_attention(q, k, v)) <= 2e-6


@pytest.mark.parametrize("b,t,s,n,d", CASES)
def test_kernel_gradients_match_xla_attention(b, t, s, n, d):
  q, k, v, weights = qkv(b, t, s, n, d, seed=1)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights)

  want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(cpu_attention.attention), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    assert rel_l2(g, w) <= 1e-5


def test_kernel_under_vmap_and_with_large_scores():
  q, k, v, _ = qkv(3, 20, 11, 2, 16)
  got = jax.vmap(cpu_attention.attention)(q[:, None], k[:, None], v[:, None])[:, 0]
  assert rel_l2(got, softmax_attention(q, k, v)) <= 2e-6
  # Scores in the hundreds: the softmax must subtract each row's maximum before exponentiating, and
  # in key chunks rescale the earlier chunks' sums when a later chunk holds a larger one.
  big = 30 * q
  assert rel_l2(cpu_attention.attention(big, k, v), softmax_attention(big, k, v)) <= 1e-5
  q, k, v, _ = qkv(1, 40, 600, 2, 16, seed=3)
  k = k.at[:, 590].multiply(8.0)  # rows with their largest score in the last chunk
  assert rel_l2(cpu_attention.attention(30 * q, k, v), softmax_attention(30 * q, k, v)) <= 1e-5


def test_multi_head_attention_on_cpu_uses_the_kernel(monkeypatch):
  monkeypatch.setattr(attention, "CPU_IMPLEMENTATION", "kernel")
  q, k, v, _ = qkv(2, 16, 7, 4, 16)
  flat = [x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)]  # [B, T, N*Dh]
  with jax.default_device(jax.devices("cpu")[0]):
    jaxpr = str(jax.make_jaxpr(lambda *a: attention.multi_head_attention(*a, heads=4))(*flat))
    got = attention.multi_head_attention(*flat, heads=4)
  assert "DiffusionJaxAttentionForward" in jaxpr
  assert rel_l2(got, softmax_attention(q, k, v).reshape(2, 16, 64)) <= 2e-6
  # bfloat16 and masks stay with XLA.
  half = [x.astype(jnp.bfloat16) for x in flat]
  assert "DiffusionJaxAttentionForward" not in str(jax.make_jaxpr(
      lambda *a: attention.multi_head_attention(*a, heads=4))(*half))


def _run(code, **env):
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_without_a_compiler_attention_falls_back_to_tiles_with_a_warning(tmp_path):
  code = """
    import warnings, jax, jax.numpy as jnp
    from diffusion_jax.nn import attention
    x = jnp.ones((1, 8, 32))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      jaxpr = str(jax.make_jaxpr(lambda x: attention.multi_head_attention(x, x, x, heads=2))(x))
    print("KERNEL" if "DiffusionJaxAttentionForward" in jaxpr else "TILES")
    print("WARNED" if any("not available" in str(w.message) for w in caught) else "SILENT")
  """
  result = _run(code, CXX=str(tmp_path / "no-such-compiler"), DIFFUSION_JAX_CACHE=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["TILES", "WARNED"]
  result = _run(code, DIFFUSION_JAX_CPU_KERNEL="0", DIFFUSION_JAX_CACHE=str(tmp_path))
  assert result.stdout.split() == ["TILES", "SILENT"], result.stderr


def test_the_library_is_built_once_and_reused(tmp_path):
  code = """
    import os
    from diffusion_jax.nn import cpu_attention
    assert cpu_attention.available()
    directory = cpu_attention.cache_dir()
    print([(name, os.stat(os.path.join(directory, name)).st_mtime_ns) for name in sorted(os.listdir(directory))])
  """
  first = _run(code, DIFFUSION_JAX_CACHE=str(tmp_path))
  second = _run(code, DIFFUSION_JAX_CACHE=str(tmp_path))
  assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
  assert first.stdout == second.stdout and ".so'" in first.stdout  # one library, found again, not rebuilt


def _cpu_flags() -> set:
  try:
    with open("/proc/cpuinfo") as f:
      return set(next((line for line in f if line.startswith("flags")), "").split())
  except OSError:
    return set()


# The kernel's vector width follows the instruction set it is built for: 8 lanes with AVX2, 4 with SSE
# (and NEON). This machine's own build is tested above; these build the narrower ones where they run.
@pytest.mark.parametrize("arch,needs", [("-march=x86-64-v3", {"avx2", "fma"}), ("-march=x86-64", set())])
def test_narrower_instruction_sets_agree(tmp_path, arch, needs):
  import platform
  if platform.machine() not in ("x86_64", "AMD64") or not needs <= _cpu_flags():
    pytest.skip(f"{arch} builds do not run on this CPU")
  code = """
    import jax, jax.numpy as jnp, numpy as np
    from diffusion_jax.nn import cpu_attention
    assert cpu_attention.available()
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(key, shape) for key, shape in zip(ks, [(2, 37, 3, 24), (2, 19, 3, 24), (2, 19, 3, 24), (2, 37, 3, 24)]))
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    want = [jax.nn.dot_product_attention(q, k, v), *jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)]
    got = [cpu_attention.attention(q, k, v), *jax.grad(loss(cpu_attention.attention), (0, 1, 2))(q, k, v)]
    print(max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(got, want)))
  """
  result = _run(code, DIFFUSION_JAX_CACHE=str(tmp_path), DIFFUSION_JAX_CPU_KERNEL_ARCH=arch)
  assert result.returncode == 0, result.stderr
  assert float(result.stdout) <= 1e-5
