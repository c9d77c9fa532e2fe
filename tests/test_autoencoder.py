"""AutoencoderKL against diffusers' AutoencoderKL (same random weights), its config and its checkpoints."""
import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax.traverse_util import flatten_dict as flatten

from diffusion_jax import hardware
from diffusion_jax.convert.keys import flax_to_torch, torch_to_flax
from diffusion_jax.nn import autoencoder as ae

# Every block type: two levels (a downsampler, an upsampler, width-changing shortcuts), two resnets
# per encoder level (three per decoder level) and the mid-block attention.
SMALL = ae.AutoencoderConfig(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
                             latent_channels=4, sample_size=16)
IMAGE_SHAPE = (2, 16, 16, 3)  # [B, H, W, C]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def torch_reference(config, seed=0):
  """diffusers' AutoencoderKL with random weights everywhere, norms and biases moved off their init."""
  torch.manual_seed(seed)
  kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
  model = TorchAutoencoderKL(**kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and name.endswith("weight"):  # norm scales
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


def abstract_params(model, image_shape=IMAGE_SHAPE):
  image_shape = (*image_shape[:-1], model.config.in_channels)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape))
  return flax.linen.meta.unbox(shapes["params"])


def convert(torch_model, flax_model, state_dict=None):
  sd = state_dict or {k: v.numpy() for k, v in torch_model.state_dict().items()}
  return torch_to_flax(sd.keys(), sd.__getitem__, abstract_params(flax_model))


def inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, IMAGE_SHAPE).astype(np.float32)
  f = config.downsample_factor
  latents = rng.standard_normal((IMAGE_SHAPE[0], IMAGE_SHAPE[1] // f, IMAGE_SHAPE[2] // f,
                                 config.latent_channels)).astype(np.float32)
  return images, latents


def torch_outputs(torch_model, images, latents):
  with torch.no_grad():
    posterior = torch_model.encode(nchw(images)).latent_dist
    decoded = torch_model.decode(nchw(latents)).sample
  return nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(decoded)


def flax_outputs(model, params, images, latents):
  @jax.jit
  def run(p, x, z):
    mean, logvar = model.apply({"params": p}, x, method="encode")
    return mean, logvar, model.apply({"params": p}, z, method="decode")
  return run(params, images, latents)


@pytest.fixture(scope="module")
def small():
  torch_model = torch_reference(SMALL)
  images, latents = inputs(SMALL)
  params = convert(torch_model, ae.AutoencoderKL(SMALL))
  return torch_model, params, images, latents, torch_outputs(torch_model, images, latents)


# The implementation choices of the model run on: those `hardware` makes for this machine's devices,
# and the CPU's alternatives (XLA tiles, every upsampler as one convolution). bf16 runs the default "xla".
@pytest.mark.parametrize("choices", [None, dict(attention="cpu_tiles", upsample_conv_min_side=1)],
                         ids=["configured", "alternatives"])
def test_parity_float32(small, choices):
  _, params, images, latents, want = small
  config = hardware.configure(SMALL, force=True) if choices is None else dataclasses.replace(SMALL, **choices)
  got = flax_outputs(ae.AutoencoderKL(config), params, images, latents)
  for name, g, w in zip(("mean", "logvar", "decoded"), got, want):
    assert g.shape == w.shape, name
    assert g.dtype == jnp.float32
    assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))


def test_parity_bfloat16_compute(small):
  _, params, images, latents, want = small
  model = ae.AutoencoderKL(SMALL, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  got = flax_outputs(model, params, images, latents)
  for name, g, w in zip(("mean", "logvar", "decoded"), got, want):
    assert g.dtype == jnp.float32  # outputs are upcast
    assert rel_err(g, w) <= 2e-2, (name, rel_err(g, w))
    assert rel_err(g, w) > 0  # the bf16 path really ran in bf16


def test_parity_without_optional_parts():
  # No quant convs, no mid-block attention, odd channel counts, one resnet per level.
  config = ae.AutoencoderConfig(in_channels=1, out_channels=2, latent_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, use_quant_conv=False,
                                use_post_quant_conv=False, mid_block_add_attention=False)
  torch_model = torch_reference(config, seed=1)
  params = convert(torch_model, ae.AutoencoderKL(config))
  assert "quant_conv" not in params and "attentions_0" not in params["decoder"]["mid_block"]
  images, latents = inputs(config, seed=1)
  images = images[..., :config.in_channels]
  want = torch_outputs(torch_model, images, latents)
  got = flax_outputs(ae.AutoencoderKL(config), params, images, latents)
  for name, g, w in zip(("mean", "logvar", "decoded"), got, want):
    assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))


def test_kl_divergence_matches_diffusers():
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((3, 4, 5, 4)).astype(np.float32)
  logvar = rng.uniform(-35, 22, (3, 4, 5, 4)).astype(np.float32)  # exercises both clip bounds
  logvar[0] = rng.uniform(-2, 2, logvar[0].shape)
  want = DiagonalGaussianDistribution(torch.cat([nchw(mean), nchw(logvar)], dim=1)).kl().numpy()
  got = np.asarray(ae.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar)))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_encode_clips_logvar_like_diffusers(small):
  torch_model, params, images, _, _ = small
  # Push the quant_conv bias so that the raw log-variance leaves [-30, 20] on some channels.
  bias = np.array(params["quant_conv"]["bias"])
  c = SMALL.latent_channels
  bias[c:c + 2] = [-80.0, 80.0]
  params = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
  with torch.no_grad():
    torch_model.quant_conv.bias.copy_(torch.from_numpy(bias))
    want = nhwc(torch_model.encode(nchw(images)).latent_dist.logvar)
  _, logvar = jax.jit(lambda p: ae.AutoencoderKL(SMALL).apply({"params": p}, images, method="encode"))(params)
  assert np.asarray(logvar).min() == ae.LOGVAR_MIN and np.asarray(logvar).max() == ae.LOGVAR_MAX
  assert rel_err(logvar, want) <= 1e-5


@pytest.mark.slow
def test_training_call(small):
  _, params, images, _, _ = small
  model = ae.AutoencoderKL(SMALL)
  variables = {"params": params}
  key = jax.random.key(3)

  @jax.jit
  def run(x):
    mean, logvar = model.apply(variables, x, method="encode")
    latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    decoded = model.apply(variables, jnp.concatenate([latents, mean]), method="decode")
    sampled = model.apply(variables, x, key)
    deterministic = model.apply(variables, x, sample_posterior=False)
    return (mean, logvar), jnp.split(decoded, 2), sampled, deterministic

  (mean, logvar), (want_sampled, want_mean), sampled, deterministic = run(images)
  np.testing.assert_allclose(sampled[1], mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sampled[2], logvar, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sampled[0], want_sampled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(deterministic[0], want_mean, rtol=1e-5, atol=1e-5)
  assert rel_err(sampled[0], deterministic[0]) > 1e-3  # the posterior noise reached the decoder
  with pytest.raises(ValueError, match="PRNG key"):
    jax.eval_shape(lambda x: model.apply(variables, x), images)


def test_sample_latent_distribution():
  mean = jnp.array([[-1.0, 0.5, 3.0]])
  logvar = jnp.array([[0.0, -2.0, 1.5]])
  draws = jax.vmap(lambda k: ae.sample_latent(mean, logvar, k))(jax.random.split(jax.random.key(0), 20000))
  np.testing.assert_allclose(draws.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(draws.std(0), jnp.exp(0.5 * logvar), rtol=0.03)
  # Reparameterised: gradients flow to both moments.
  g_mean, g_logvar = jax.grad(lambda m, lv: ae.sample_latent(m, lv, jax.random.key(1)).sum(), (0, 1))(mean, logvar)
  assert np.all(np.asarray(g_mean) == 1.0) and np.all(np.asarray(g_logvar) != 0.0)


def test_scaling_helpers():
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  np.testing.assert_allclose(ae.scale_latents(z, ae.SD), z * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(ae.unscale_latents(ae.scale_latents(z, ae.SD), ae.SD), z, rtol=1e-5, atol=1e-6)
  shifted = ae.AutoencoderConfig(scaling_factor=1.5, shift_factor=0.25)
  np.testing.assert_allclose(ae.scale_latents(z, shifted), (z - 0.25) * 1.5, rtol=1e-6)  # SD3 pipelines
  np.testing.assert_allclose(ae.unscale_latents(z, shifted), z / 1.5 + 0.25, rtol=1e-6)
  stats = ae.AutoencoderConfig(scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.3, 0.0),
                               latents_std=(1.0, 2.0, 0.5, 4.0))
  m, s = np.array(stats.latents_mean), np.array(stats.latents_std)
  np.testing.assert_allclose(ae.scale_latents(z, stats), (z - m) * 0.5 / s, rtol=1e-6)  # SDXL pipelines
  np.testing.assert_allclose(ae.unscale_latents(z, stats), z * s / 0.5 + m, rtol=1e-6)
  assert ae.estimate_scaling_factor(3.0 * z) == pytest.approx(1.0 / float(jnp.std(3.0 * z)))


def _torch_shapes(config):
  with torch.device("meta"):
    model = TorchAutoencoderKL.from_config(config.to_diffusers())
  return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [
    ae.SD, ae.TINY, SMALL,
    ae.AutoencoderConfig(**{**SMALL.__dict__, "use_quant_conv": False, "mid_block_add_attention": False}),
], ids=["SD", "TINY", "SMALL", "no_quant_no_attention"])
def test_config_round_trip_through_diffusers(config):
  torch_model, want = _torch_shapes(config)
  assert ae.AutoencoderConfig.from_diffusers(dict(torch_model.config)) == config
  ours = abstract_params(ae.AutoencoderKL(config), (1, 32, 32, 3))
  got = {k: tuple(v.shape) for k, v in flax_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, np.int8), ours)).items()}
  assert set(got) == set(want)
  # flax_to_torch transposes kernels back to the torch layout, so shapes compare one to one.
  assert got == want


def test_sd_parameter_count():
  torch_model, _ = _torch_shapes(ae.SD)
  want = sum(p.numel() for p in torch_model.parameters())
  ours = abstract_params(ae.AutoencoderKL(ae.SD), (1, 64, 64, 3))
  got = sum(math.prod(x.shape) for x in jax.tree.leaves(ours))
  assert got == want == 83_653_863


def test_from_diffusers_sd_config_json():
  # The keys of the published SD 1.x VAE config.json (older files lack the newer options).
  config_json = {
      "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
      "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
      "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
      "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
  }
  assert ae.AutoencoderConfig.from_diffusers(config_json) == ae.SD
  assert ae.SD.scaling_factor == 0.18215 and ae.SD.shift_factor is None
  assert ae.AutoencoderConfig.from_diffusers(ae.SD.to_diffusers()) == ae.SD


def test_implementation_choices_are_our_own_fields():
  chosen = dict(attention="cpu_kernel", upsample_conv_min_side=16)
  config = ae.AutoencoderConfig.from_diffusers(SMALL.to_diffusers(), **chosen)
  assert config == dataclasses.replace(SMALL, **chosen)
  assert config.to_diffusers() == SMALL.to_diffusers()
  for key, value in chosen.items():
    with pytest.raises(ValueError, match="unsupported config options"):
      ae.AutoencoderConfig.from_diffusers({**SMALL.to_diffusers(), key: value})
  with pytest.raises(ValueError, match="attention"):
    dataclasses.replace(SMALL, attention="flash")


@pytest.mark.parametrize("field", ["attention", "upsample_conv_min_side"])
def test_the_model_refuses_auto(field):
  config = dataclasses.replace(SMALL, **{field: "auto"})
  with pytest.raises(ValueError, match=f"{field}='auto'.*hardware.configure"):
    abstract_params(ae.AutoencoderKL(config))
  assert getattr(hardware.configure(config), field) == hardware.choices()[field]


@pytest.mark.parametrize("change, message", [
    (dict(act_fn="gelu"), "act_fn"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "down_block_types"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types"),
    (dict(norm_type="spatial"), "unsupported config options"),
    (dict(norm_num_groups=5), "divisible"),
])
def test_unsupported_options_raise(change, message):
  with pytest.raises(ValueError, match=message):
    ae.AutoencoderConfig.from_diffusers({**SMALL.to_diffusers(), **change})


def test_legacy_attention_names_load(small):
  torch_model, params, _, _, _ = small
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for k, v in torch_model.state_dict().items():
    for new, old in legacy_names.items():
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    legacy[k] = v.numpy()
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert not any(".to_q." in k for k in legacy)
  loaded = convert(torch_model, ae.AutoencoderKL(SMALL), legacy)
  flat_loaded, flat_new = flatten(loaded), flatten(params)
  assert flat_loaded.keys() == flat_new.keys()
  for path in flat_new:
    np.testing.assert_array_equal(flat_loaded[path], flat_new[path])


@pytest.mark.slow
def test_remat_same_values_and_gradients():
  config = ae.AutoencoderConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)
  remat = ae.AutoencoderConfig(**{**config.__dict__, "remat": True})
  params = flax.linen.meta.unbox(ae.AutoencoderKL(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
  images = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3), minval=-1, maxval=1)
  key = jax.random.key(2)

  def loss(config, p):
    recon, mean, logvar = ae.AutoencoderKL(config).apply({"params": p}, images, key)
    return jnp.mean(jnp.square(recon - images)) + 1e-3 * ae.kl_divergence(mean, logvar).mean()

  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(config, p)))(params)
  value_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-7)
