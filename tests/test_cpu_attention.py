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



@pytest.fixture(autouse=True)
def kernel():
  """Builds the kernel once per process (at the first test, not while collecting) or skips with the reason."""
  if not cpu_attention.available():
    pytest.skip("the CPU attention kernel did not build here")


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


def test_multi_head_attention_runs_the_kernel_where_chosen():
  q, k, v, _ = qkv(2, 16, 7, 4, 16)
  flat = [x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)]  # [B, T, N*Dh]
  kernel = lambda *a, **kw: attention.multi_head_attention(*a, heads=4, implementation="cpu_kernel", **kw)
  with jax.default_device(jax.devices("cpu")[0]):
    jaxpr = str(jax.make_jaxpr(kernel)(*flat))
    got = kernel(*flat)
  assert "DiffusionJaxAttentionForward" in jaxpr
  assert rel_l2(got, softmax_attention(q, k, v).reshape(2, 16, 64)) <= 2e-6
  # bfloat16 runs as the tiles; masks stay with XLA.
  half = [x.astype(jnp.bfloat16) for x in flat]
  jaxpr = str(jax.make_jaxpr(kernel)(*half))
  assert "DiffusionJaxAttentionForward" not in jaxpr and "custom_vjp_call" in jaxpr
  masked = str(jax.make_jaxpr(lambda *a: kernel(*a, mask=jnp.ones((1, 1, 16, 7), bool)))(*flat))
  assert "DiffusionJaxAttentionForward" not in masked and "custom_vjp_call" not in masked


def _run(code, **env):
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_without_a_compiler_attention_falls_back_to_tiles_with_a_warning(tmp_path):
  code = f"""
    import warnings, jax, jax.numpy as jnp
    from diffusion_jax.nn import attention, cpu_attention
    x = jnp.ones((1, 8, 32))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      print(cpu_attention.available(cpu_attention.BuildSettings({str(tmp_path)!r}, compiler={str(tmp_path / "no-cc")!r})))
      jaxpr = str(jax.make_jaxpr(lambda x: attention.multi_head_attention(x, x, x, heads=2,
                                                                           implementation="cpu_kernel"))(x))
    print("KERNEL" if "DiffusionJaxAttentionForward" in jaxpr else "TILES")
    print(sum("not available" in str(w.message) for w in caught))
  """
  result = _run(code, PATH="/nonexistent")  # no c++ or g++ for the models' own (default) build either
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["False", "TILES", "2"]  # one warning per reason


def test_the_library_is_built_once_and_reused(tmp_path):
  code = f"""
    import os
    from diffusion_jax.nn import cpu_attention
    assert cpu_attention.available(cpu_attention.BuildSettings(cache_dir={str(tmp_path)!r}))
    print([(name, os.stat(os.path.join({str(tmp_path)!r}, name)).st_mtime_ns) for name in sorted(os.listdir({str(tmp_path)!r}))])
  """
  first = _run(code)
  second = _run(code)
  assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
  assert first.stdout == second.stdout and ".so'" in first.stdout  # one library, found again, not rebuilt


def test_a_build_kept_nowhere_leaves_no_file(tmp_path):
  code = """
    from diffusion_jax.nn import cpu_attention
    assert cpu_attention.available(cpu_attention.BuildSettings(cache_dir=None))
    assert cpu_attention.available()  # the models' own call finds it loaded, builds nothing more
  """
  result = _run(code, HOME=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert not any(tmp_path.rglob("*.so"))


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
  code = f"""
    import jax, jax.numpy as jnp, numpy as np
    from diffusion_jax.nn import cpu_attention
    assert cpu_attention.available(cpu_attention.BuildSettings({str(tmp_path)!r}, arch={arch!r}))
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(key, shape) for key, shape in zip(ks, [(2, 37, 3, 24), (2, 19, 3, 24), (2, 19, 3, 24), (2, 37, 3, 24)]))
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    want = [jax.nn.dot_product_attention(q, k, v), *jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)]
    got = [cpu_attention.attention(q, k, v), *jax.grad(loss(cpu_attention.attention), (0, 1, 2))(q, k, v)]
    print(max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(got, want)))
  """
  result = _run(code)
  assert result.returncode == 0, result.stderr
  assert float(result.stdout) <= 1e-5
