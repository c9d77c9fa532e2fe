"""Tiled CPU attention against jax.nn.dot_product_attention: outputs and gradients, fp32 and bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.nn import attention


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def qkv(b, t, s, n, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = 2 * jax.random.normal(ks[0], (b, t, n, d))
  k = 2 * jax.random.normal(ks[1], (b, s, n, d))
  v = jax.random.normal(ks[2], (b, s, n, d))
  weights = jax.random.normal(ks[3], (b, t, n, d))  # a loss that weighs every output differently
  return q, k, v, weights


# (batch, queries, keys, heads, head dim, tile elements): one tile; several (batch, head) pairs per tile;
# several query chunks per pair (the backward pass accumulates dk, dv over them); uneven divisors.
CASES = [(2, 12, 12, 2, 8, 1 << 20), (2, 16, 7, 4, 8, 256), (1, 32, 32, 2, 4, 128), (3, 10, 5, 2, 6, 12)]


@pytest.mark.parametrize("b,t,s,n,d,tile", CASES)
def test_tiled_attention_matches_reference_with_gradients(b, t, s, n, d, tile):
  q, k, v, weights = qkv(b, t, s, n, d)
  want = jax.nn.dot_product_attention(q, k, v)
  got = jax.jit(lambda q, k, v: attention.tiled_attention(q, k, v, tile))(q, k, v)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert rel_l2(got, want) <= 1e-6

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights)

  want_grads = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  got_grads = jax.jit(jax.grad(loss(lambda q, k, v: attention.tiled_attention(q, k, v, tile)),
                               argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got_grads, want_grads):
    assert rel_l2(g, w) <= 1e-5


def test_tiled_attention_bf16_within_tolerance():
  q, k, v, _ = qkv(2, 16, 7, 4, 8)
  want = jax.nn.dot_product_attention(q, k, v)
  got = attention.tiled_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), 256)
  assert got.dtype == jnp.bfloat16
  assert rel_l2(got.astype(jnp.float32), want) <= 2e-2


def test_tiling_keeps_tiles_within_budget_and_divides_evenly():
  for pairs, tq, tk, budget in [(64, 1024, 1024, 1 << 20), (8, 4096, 4096, 1 << 20), (64, 1024, 77, 1 << 20),
                                (6, 10, 5, 12), (3, 7, 1000, 100)]:
    group, chunk = attention._tiling(pairs, tq, tk, budget)
    assert pairs % group == 0 and tq % chunk == 0
    assert group * chunk * tk <= max(budget, tk)  # a single query row may exceed a tiny budget
    assert group == 1 or chunk == tq  # pairs are only grouped when a tile holds all their queries


def test_multi_head_attention_with_tiles_agrees():
  q, k, v, _ = qkv(2, 16, 7, 4, 8)
  flat = [x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)]  # [B, T, N*Dh]
  tiles = lambda *a: attention.multi_head_attention(*a, heads=4, implementation="cpu_tiles")
  got = tiles(*flat)
  want = jax.nn.dot_product_attention(q, k, v).reshape(2, 16, 32)
  assert rel_l2(got, want) <= 1e-6
  assert "custom_vjp_call" in str(jax.make_jaxpr(tiles)(*flat))  # the tiled path, not jax.nn.dot_product_attention's
  plain = jax.make_jaxpr(lambda *a: attention.multi_head_attention(*a, heads=4))(*flat)
  assert "custom_vjp_call" not in str(plain)  # "xla", the default, on any backend


def test_multi_head_attention_refuses_auto_and_unknown_implementations():
  x = jnp.ones((1, 8, 16))
  with pytest.raises(ValueError, match="hardware.configure"):
    attention.multi_head_attention(x, x, x, heads=2, implementation="auto")
  with pytest.raises(ValueError, match="use one of"):
    attention.multi_head_attention(x, x, x, heads=2, implementation="flash")


def test_fused_attention_falls_back_where_the_kernel_is_missing(monkeypatch):
  q, k, v, _ = qkv(2, 16, 7, 4, 8)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  want = jax.nn.dot_product_attention(q, k, v)
  if jax.default_backend() == "cpu":  # no cuDNN: the fused call says so
    with pytest.warns(UserWarning, match="fused attention"):
      assert attention.fused_attention(q, k, v) is None
  else:  # on a GPU, the fused kernel agrees with XLA's attention (None: its cuDNN lacks one, as below)
    fused = attention.fused_attention(q, k, v)
    if fused is not None:
      assert fused.dtype == jnp.bfloat16
      assert rel_l2(fused.astype(jnp.float32), want.astype(jnp.float32)) <= 1e-2

  # A GPU or head size the kernel lacks, on any machine: multi_head_attention must use XLA's attention.
  xla_attention = jax.nn.dot_product_attention

  def without_kernel(*args, implementation=None, **kwargs):
    if implementation is not None:
      raise NotImplementedError(f"no {implementation} kernel for these shapes")
    return xla_attention(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", without_kernel)
  flat = [x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)]
  cudnn = lambda *a: attention.multi_head_attention(*a, heads=4, implementation="cudnn")
  got = cudnn(*flat)
  want = want.reshape(2, 16, 32)
  assert got.dtype == jnp.bfloat16
  assert rel_l2(got.astype(jnp.float32), want.astype(jnp.float32)) <= 1e-2
  assert "custom_vjp_call" not in str(jax.make_jaxpr(cudnn)(*flat))  # not the CPU's tiled path


def test_fused_attention_is_asked_for_16_bit_unmasked_attention_when_cudnn_is_chosen(monkeypatch):
  calls = []
  monkeypatch.setattr(attention, "fused_attention", lambda q, k, v, impl: calls.append((q.dtype, q.shape[-1], impl)))
  cudnn = lambda *a, **kw: attention.multi_head_attention(*a, implementation="cudnn", **kw)
  q, k, v, _ = qkv(1, 8, 8, 2, 8)
  flat = [x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)]  # [1, 8, 16]
  half = [x.astype(jnp.bfloat16) for x in flat]
  cudnn(*flat, heads=2)  # float32: XLA's
  cudnn(*half, heads=2)  # the one fused call
  cudnn(*(x.astype(jnp.float16) for x in flat), heads=2, mask=jnp.ones((1, 1, 8, 8), bool))
  cudnn(*half, heads=2, is_causal=True)  # the text encoder's
  cudnn(*half, heads=4)  # head dim 4: not a multiple of 8
  wide = [jnp.tile(x, (1, 1, 64)) for x in half]  # [1, 8, 1024]: one head of 1024 > 256, as the VAE's 512
  cudnn(*wide, heads=1)
  attention.multi_head_attention(*half, heads=2, implementation="xla")
  assert calls == [(jnp.bfloat16, 8, "cudnn")]


def _block_and_inputs(rows_per_sample=256, batch=4, channels=32, **block_kwargs):
  from flax.linen import meta
  block = attention.TransformerBlock(heads=4, dim_head=channels // 4, **block_kwargs)
  x = jax.random.normal(jax.random.key(0), (batch, rows_per_sample, channels))
  context = jax.random.normal(jax.random.key(1), (batch, 7, 16))
  params = meta.unbox(block.init(jax.random.key(2), x, context)["params"])
  return block, params, x, context


def test_feed_forward_in_chunks_is_the_same_layer():
  """The chunked feed-forward: same parameters, same outputs and gradients as in one piece."""
  block, params, x, context = _block_and_inputs()
  rows, inner = x.shape[0] * x.shape[1], x.shape[2] * 4
  chunked_block = attention.TransformerBlock(heads=4, dim_head=8, ff_chunk_elements=256 * 2 * inner)  # 4 chunks
  assert attention._ff_chunk_rows(rows, inner, chunked_block.ff_chunk_elements) == 256
  abstract = lambda b: jax.eval_shape(lambda: b.init(jax.random.key(2), x, context)["params"])
  # The same parameters, shapes and logical axis names (sharding rules): checkpoints fit both.
  assert abstract(chunked_block) == abstract(block)
  whole, whole_vjp = jax.vjp(lambda p, x: block.apply({"params": p}, x, context), params, x)
  chunked, chunked_vjp = jax.vjp(lambda p, x: chunked_block.apply({"params": p}, x, context), params, x)
  jaxpr = str(jax.make_jaxpr(lambda p: chunked_block.apply({"params": p}, x, context))(params))
  assert "scan" in jaxpr and "scan" not in str(jax.make_jaxpr(lambda p: block.apply({"params": p}, x, context))(params))
  dy = jax.random.normal(jax.random.key(3), whole.shape)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(chunked_vjp(dy)), jax.tree.leaves(whole_vjp(dy))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_feed_forward_chunks_divide_the_rows():
  chunk_elements = 1 << 19  # 2 MiB of float32 activations a chunk
  assert attention._ff_chunk_rows(8192, 512, chunk_elements) == 512
  assert attention._ff_chunk_rows(2048, 1024, chunk_elements) == 256
  assert attention._ff_chunk_rows(8191, 512, chunk_elements) == 8191  # a prime: chunks of one row would be slower
  assert attention._ff_chunk_rows(4096, 1280, chunk_elements) == 4096  # chunks below the minimum rows: one piece
  assert attention._ff_chunk_rows(1024, 2560, chunk_elements) == 1024
  assert attention._ff_chunk_rows(8192, 512, 0) == 8192  # 0: in one piece
  with pytest.raises(ValueError, match="hardware.configure"):
    attention._ff_chunk_rows(8192, 512, "auto")


def test_feed_forward_chunks_take_their_own_dropout_masks():
  from flax.linen import meta
  block = attention.TransformerBlock(heads=4, dim_head=8, dropout=0.5, ff_chunk_elements=256 * 2 * 128)
  x = jnp.ones((2, 256, 32))  # every row alike: only dropout tells the chunks' outputs apart
  context = jnp.ones((2, 7, 16))
  params = meta.unbox(block.init(jax.random.key(2), x, context)["params"])
  y = block.apply({"params": params}, x, context, deterministic=False, rngs={"dropout": jax.random.key(4)})
  chunks = np.asarray(y).reshape(2, 256, 32)  # 2 chunks of 256 rows
  assert np.isfinite(chunks).all() and not np.allclose(chunks[0], chunks[1])


@pytest.mark.parametrize("implementation", ["cpu_tiles", "cudnn"])
def test_transformer_block_runs_the_chosen_attention_with_the_same_result(implementation):
  block, params, x, context = _block_and_inputs(rows_per_sample=16, batch=2)
  chosen = attention.TransformerBlock(heads=4, dim_head=8, attention=implementation)
  want = block.apply({"params": params}, x, context)
  got = chosen.apply({"params": params}, x, context)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  tiled = "custom_vjp_call" in str(jax.make_jaxpr(lambda p: chosen.apply({"params": p}, x, context))(params))
  assert tiled == (implementation == "cpu_tiles")
