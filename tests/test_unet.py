"""UNet: parity with diffusers' UNet2DConditionModel, config round trips, parameter counts, remat."""
import functools
import math

import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.linen import meta

from diffusion_jax import hardware
from diffusion_jax.convert.keys import flax_to_torch, torch_to_flax
from diffusion_jax.nn.unet import SD15, SD21, TINY, UNet, UNetConfig

BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# SD 1 style: one head count for every block, 1x1-conv projections.
SD1_STYLE = UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8,
                       cross_attention_dim=24, norm_num_groups=8, **BLOCKS)
# SD 2 style: per-block heads (the middle block takes the last), linear projections, two-block transformers,
# uneven layers per block; two levels keep the compilation short. Also the less common options we implement:
# centred input, other conv kernels, a wider timestep MLP, sin-first embedding with a frequency shift.
SD2_STYLE = UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=(1, 2),
                       attention_head_dim=(2, 4), cross_attention_dim=24, norm_num_groups=8,
                       use_linear_projection=True, transformer_layers_per_block=(2, 1), upcast_attention=True,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                       center_input_sample=True, conv_in_kernel=5, conv_out_kernel=1, time_embedding_dim=48,
                       flip_sin_to_cos=False, freq_shift=1)
# One level, no resampling, no middle block: the cheapest UNet to compile (for the remat and timestep tests).
MICRO = UNetConfig(block_out_channels=(16,), layers_per_block=1, attention_head_dim=2, cross_attention_dim=8,
                   norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",), mid_block_type=None,
                   up_block_types=("CrossAttnUpBlock2D",))
CONFIGS = {"sd1_style": SD1_STYLE, "sd2_style": SD2_STYLE}
BATCH, SIZE, CONTEXT_LEN = 2, 16, 7


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def init_shapes(model, cfg, batch=1, size=8, context_dim=None):
  context_dim = context_dim or _context_dim(cfg)
  fn = lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, cfg.in_channels)), jnp.zeros((batch,)),
                          jnp.zeros((batch, 3, context_dim)))
  return meta.unbox(jax.eval_shape(fn)["params"])


def _context_dim(cfg):
  return cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]


@functools.lru_cache(maxsize=None)
def reference(name):
  """A diffusers UNet with every parameter (norms and biases included) moved off its init, and our params."""
  cfg = CONFIGS[name]
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel.from_config(cfg.to_diffusers()).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = torch_to_flax(sd.keys(), sd.__getitem__, init_shapes(UNet(cfg), cfg))
  return ref, sd, params


def inputs(cfg, timestep_kind):
  rng = np.random.default_rng(1)
  sample = rng.standard_normal((BATCH, SIZE, SIZE, cfg.in_channels)).astype(np.float32)
  context = rng.standard_normal((BATCH, CONTEXT_LEN, _context_dim(cfg))).astype(np.float32)
  timesteps = np.array([999, 3], np.int32) if timestep_kind == "int" else np.array([981.5, 0.25], np.float32)
  return sample, timesteps, context


def torch_forward(ref, sample, timesteps, context):
  with torch.no_grad():
    t = torch.from_numpy(timesteps.astype(np.int64 if timesteps.dtype.kind == "i" else np.float32))
    out = ref(torch.from_numpy(sample.transpose(0, 3, 1, 2)), t, torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 1)


# The implementation choices of the model run on: those `hardware` makes for this machine's devices,
# and the CPU's alternatives (XLA tiles, a chunked feed-forward, every upsampler as one convolution).
# (bf16 runs the default "xla" choices.)
CHOICES = {"configured": None,
           "alternatives": dict(attention="cpu_tiles", ff_chunk_elements=1 << 16, upsample_conv_min_side=1)}


# Integer timesteps for one config and fractional ones for the other keep the number of compilations down;
# test_scalar_and_integer_timesteps checks that both kinds (and scalars) take the same path.
@pytest.mark.parametrize("name,timestep_kind,choices", [("sd1_style", "int", "configured"),
                                                        ("sd2_style", "float", "alternatives")])
def test_parity_fp32(name, timestep_kind, choices):
  cfg = CONFIGS[name]
  ref, _, params = reference(name)
  sample, timesteps, context = inputs(cfg, timestep_kind)
  want = torch_forward(ref, sample, timesteps, context)
  chosen = (hardware.configure(cfg, force=True) if CHOICES[choices] is None
            else dataclasses.replace(cfg, **CHOICES[choices]))
  got = jax.jit(UNet(chosen).apply)({"params": params}, sample, timesteps, context)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert rel_l2(got, want) <= 1e-5, rel_l2(got, want)


def test_parity_bf16_compute():
  cfg = SD2_STYLE
  ref, _, params = reference("sd2_style")
  sample, timesteps, context = inputs(cfg, "float")
  want = torch_forward(ref, sample, timesteps, context)
  got = jax.jit(UNet(cfg, dtype=jnp.bfloat16).apply)({"params": params}, sample, timesteps, context)
  assert got.dtype == jnp.float32  # returned in the input's dtype
  assert rel_l2(got, want) <= 2e-2, rel_l2(got, want)


def micro_setup(dropout=0.0):
  cfg = UNetConfig(**{**MICRO.__dict__, "dropout": dropout})
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 3, 8)).astype(np.float32)
  # Random values for every parameter (norms and biases too); cheaper to build than a jitted init.
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32),
                        init_shapes(UNet(cfg), cfg))
  return cfg, params, sample, context


def test_scalar_and_integer_timesteps():
  cfg, params, sample, context = micro_setup()
  apply = jax.jit(UNet(cfg).apply)
  scalar_int = apply({"params": params}, sample, jnp.asarray(500), context)
  batch_float = apply({"params": params}, sample, jnp.array([500.0, 500.0]), context)
  np.testing.assert_allclose(scalar_int, batch_float, rtol=0, atol=1e-6)
  # Each row uses its own timestep.
  other = apply({"params": params}, sample, jnp.array([500.0, 20.0]), context)
  np.testing.assert_allclose(other[0], batch_float[0], rtol=0, atol=1e-6)
  assert rel_l2(other[1], batch_float[1]) > 1e-3


def test_export_keys_match_diffusers_state_dict():
  _, sd, params = reference("sd2_style")
  exported = flax_to_torch(params)
  assert set(exported) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v)


@pytest.mark.parametrize("cfg", [SD15, SD21, TINY, SD1_STYLE, SD2_STYLE, MICRO],
                         ids=["sd15", "sd21", "tiny", "sd1_style", "sd2_style", "micro"])
def test_config_round_trip_through_diffusers(cfg):
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_diffusers())
  assert UNetConfig.from_diffusers(dict(ref.config)) == cfg
  assert UNetConfig.from_diffusers(cfg.to_diffusers(), remat="transformer") == \
      UNetConfig(**{**cfg.__dict__, "remat": "transformer"})


def test_implementation_choices_are_our_own_fields():
  chosen = dict(attention="cpu_tiles", ff_chunk_elements=1 << 19, upsample_conv_min_side=16)
  cfg = UNetConfig.from_diffusers(SD15.to_diffusers(), **chosen)
  assert cfg == dataclasses.replace(SD15, **chosen)
  assert cfg.to_diffusers() == SD15.to_diffusers()  # not diffusers' options
  assert UNetConfig.from_diffusers(SD15.to_diffusers(), attention="auto").attention == "auto"  # a run config's
  for key, value in chosen.items():
    with pytest.raises(ValueError, match="unknown"):
      UNetConfig.from_diffusers({**SD15.to_diffusers(), key: value})
  for bad in (dict(attention="flash"), dict(ff_chunk_elements=-1), dict(upsample_conv_min_side="fast")):
    with pytest.raises(ValueError, match=next(iter(bad))):
      dataclasses.replace(MICRO, **bad)


@pytest.mark.parametrize("field", ["attention", "ff_chunk_elements", "upsample_conv_min_side"])
def test_the_model_refuses_auto(field):
  cfg = dataclasses.replace(MICRO, **{field: "auto"})
  with pytest.raises(ValueError, match=f"{field}='auto'.*hardware.configure"):
    init_shapes(UNet(cfg), cfg)
  configured = hardware.configure(cfg)
  assert getattr(configured, field) == hardware.choices()[field]
  init_shapes(UNet(configured), configured)


def test_sd15_hub_config_gives_preset():
  # unet/config.json of runwayml/stable-diffusion-v1-5.
  hub = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
         "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
         "cross_attention_dim": 768,
         "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"],
         "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
         "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
         "out_channels": 4, "sample_size": 64,
         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
  assert UNetConfig.from_diffusers(hub) == SD15


@pytest.mark.parametrize("option", [
    {"class_embed_type": "timestep"}, {"addition_embed_type": "text_time"}, {"time_cond_proj_dim": 256},
    {"attention_type": "gated"}, {"only_cross_attention": True}, {"resnet_time_scale_shift": "scale_shift"},
    {"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, {"mid_block_type": "UNetMidBlock2D"},
    {"transformer_layers_per_block": [[1, 2], [1, 2], [1, 2], [1, 2]]}, {"some_future_option": 1},
    {"cross_attention_dim": [768, 768, 1024, 1024]}, {"attention_head_dim": [8, 8, 7, 8]},
    {"norm_num_groups": None}, {"block_out_channels": [320, 640, 1280]},
])
def test_unsupported_options_raise(option):
  with pytest.raises(ValueError):
    UNetConfig.from_diffusers({**SD15.to_diffusers(), **option})


def test_rejects_sizes_the_downsamplers_cannot_halve():
  cfg = SD1_STYLE
  with pytest.raises(ValueError, match="divisible"):
    init_shapes(UNet(cfg), cfg, size=6)


@pytest.mark.parametrize("cfg,expected", [(SD15, 859_520_964), (SD21, 865_910_724)], ids=["sd15", "sd21"])
def test_full_size_parameter_counts(cfg, expected):
  ours = sum(math.prod(x.shape) for x in jax.tree.leaves(init_shapes(UNet(cfg), cfg)))
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_diffusers())
  assert ours == sum(p.numel() for p in ref.parameters()) == expected


def test_remat_gives_same_output_and_gradients():
  # Dropout is on, so the (static) `deterministic` flag and the dropout masks go through the remat wrappers.
  cfg, params, sample, context = micro_setup(dropout=0.1)
  timesteps = np.array([10, 700])

  def loss_and_grad(remat):
    model = UNet(UNetConfig(**{**cfg.__dict__, "remat": remat}))
    def loss(p, rng):
      out = model.apply({"params": p}, sample, timesteps, context, False, rngs={"dropout": rng})
      return jnp.mean(out ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  # "rbg" keys: far cheaper to compile than threefry on the CPU.
  rng, other_rng = jax.random.key(3, impl="rbg"), jax.random.key(4, impl="rbg")
  reference_fn = loss_and_grad("none")
  (_, want_out), want_grad = reference_fn(params, rng)
  (_, other_out), _ = reference_fn(params, other_rng)
  assert rel_l2(other_out, want_out) > 1e-3  # dropout is active in training mode
  # "transformer" wraps the spatial transformers; a policy name wraps resnets and transformers.
  for remat in ("transformer", "dots_with_no_batch_dims_saveable"):
    (_, out), grad = loss_and_grad(remat)(params, rng)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
