"""Every sampler against the matching diffusers scheduler, step by step, with the same fake model and noise."""
import functools
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax.diffusion import losses, samplers
from diffusion_jax.diffusion.schedules import SchedulerConfig

SHAPE = (2, 3, 3, 4)  # [B, h, w, C]; the fake model is elementwise, so layout does not matter
W = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)  # fixed pattern inside the fake model


def jax_model(x, t):
  """A deterministic stand-in for the UNet: linear in x, smooth in t."""
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  return x * (0.6 + 0.3 * jnp.cos(t / 400.0)) + 0.3 * jnp.sin(t / 250.0 + jnp.asarray(W))


def torch_model(x, t):
  t = torch.as_tensor(t, dtype=torch.float32)
  return x * (0.6 + 0.3 * torch.cos(t / 400.0)) + 0.3 * torch.sin(t / 250.0 + torch.from_numpy(W))


def make_scheduler(name, config, **kwargs):
  cls = getattr(diffusers, samplers.DIFFUSERS_SCHEDULERS[name])
  if name == "dpmpp_2m_karras":
    kwargs["use_karras_sigmas"] = True
  return cls.from_config(config.to_dict(), **kwargs)


@jax.jit
def _draw(key, i):
  return jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32)


def step_noises(key, n):
  """The noise our samplers draw at step i: normal(fold_in(key, i))."""
  return [np.asarray(_draw(key, i)) for i in range(n)]


def run_diffusers(name, config, noise, n, monkeypatch, *, noises=None, eta=None, start_step=0, init_latents=None,
                  mask=None):
  """diffusers' StableDiffusionPipeline loop (plus img2img / legacy inpainting); returns the states after each step."""
  sched = make_scheduler(name, config)
  sched.set_timesteps(n)
  current = {"step": 0}
  module = sys.modules[type(sched).__module__]
  if noises is not None and hasattr(module, "randn_tensor"):  # the scheduler's draws become our per-step draws
    fake = lambda shape, **kw: torch.from_numpy(noises[current["step"]]).reshape(shape)
    monkeypatch.setattr(module, "randn_tensor", fake)
  order = sched.order
  timesteps = sched.timesteps[start_step * order:]
  noise_t = torch.from_numpy(noise)
  if init_latents is not None and mask is None:
    if hasattr(sched, "set_begin_index"):
      sched.set_begin_index(start_step * order)
    latents = sched.add_noise(torch.from_numpy(init_latents), noise_t, timesteps[:1])
  else:
    latents = noise_t * sched.init_noise_sigma
  kwargs = {} if eta is None else {"eta": eta}
  states = []
  for i, t in enumerate(timesteps):
    current["step"] = start_step + i // order
    model_in = sched.scale_model_input(latents, t)
    latents = sched.step(torch_model(model_in, t), t, latents, **kwargs).prev_sample
    if mask is not None:  # StableDiffusionInpaintPipeline with a 4-channel UNet
      known = torch.from_numpy(init_latents)
      if i < len(timesteps) - 1:
        known = sched.add_noise(known, noise_t, torch.tensor([timesteps[i + 1]]))
      latents = (1 - torch.from_numpy(mask)) * known + torch.from_numpy(mask) * latents
    if name != "heun" or sched.state_in_first_order or i == len(timesteps) - 1:
      states.append(latents.numpy().copy())
  return sched, states


# One compiled program per (sampler, prediction type, step count, start step, post_step): plans are pytree
# arguments, so the schedules and spacings of a parametrised test reuse it.
SAMPLE = jax.jit(samplers.sample, static_argnums=(0, 1), static_argnames=("start_step", "post_step"))
STATES = {}


def record_state(x, i):
  """post_step that records the loop state after each step."""
  jax.debug.callback(lambda i, x: STATES.__setitem__(int(i), np.asarray(x)), i, x)
  return x


def run_ours(name, config, noise, n, key, *, eta=0.0, start_step=0, init_latents=None, post_step=record_state):
  """Our sampler under jit; returns the plan, the states after each step and the output."""
  plan = samplers.make_plan(name, config, n, eta=eta)
  STATES.clear()
  out = np.asarray(SAMPLE(name, jax_model, noise, plan, key, start_step=start_step, init_latents=init_latents,
                          post_step=post_step))
  return plan, [STATES[i] for i in sorted(STATES)], out


def assert_close(ours, ref, rtol=1e-5):
  """Relative to the state's largest magnitude: elementwise relative error is meaningless near zero."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def check_plan(plan, sched, name):
  """Timesteps, noise levels and init_noise_sigma equal the scheduler's."""
  timesteps, sigmas = sched.timesteps.numpy(), None
  if name == "heun":  # diffusers interleaves the two evaluations of each step
    timesteps = timesteps[0::2]
    sigmas = np.append(sched.sigmas.numpy()[0::2], sched.sigmas.numpy()[-1])
  elif name not in ("ddpm", "ddim"):
    sigmas = sched.sigmas.numpy()
  np.testing.assert_array_equal(plan.timesteps, timesteps.astype(np.float32))
  if sigmas is not None:
    np.testing.assert_allclose(plan.ve_sigmas(), sigmas, rtol=2e-6)
  else:
    alphas_cumprod = sched.alphas_cumprod.numpy()[sched.timesteps.numpy()]
    np.testing.assert_allclose(plan.alpha**2, alphas_cumprod, rtol=1e-6)
    np.testing.assert_allclose(plan.sigma**2, 1 - alphas_cumprod, rtol=1e-6)
  np.testing.assert_allclose(plan.init_noise_sigma, float(sched.init_noise_sigma), rtol=1e-6)


NOISE = np.random.RandomState(1).randn(*SHAPE).astype(np.float32)
@functools.cache
def prng_key():
  """The samplers' PRNG key, made on first use rather than at collection (rbg: compiles in a fraction of
  threefry's time on the CPU); concrete even when first asked for inside a trace."""
  with jax.ensure_compile_time_eval():
    return jax.random.key(7, impl="rbg")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_trajectory_matches_diffusers(name, prediction_type, spacing, monkeypatch):
  config = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
  n = 10
  noises = step_noises(prng_key(), n)
  sched, ref = run_diffusers(name, config, NOISE, n, monkeypatch, noises=noises)
  plan, ours, out = run_ours(name, config, NOISE, n, prng_key())
  check_plan(plan, sched, name)
  assert len(ours) == len(ref) == n
  for i, (a, b) in enumerate(zip(ours, ref)):
    assert_close(a, b), f"step {i}"
  assert_close(out, ref[-1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_diffusers(eta, prediction_type, monkeypatch):
  config = SchedulerConfig(prediction_type=prediction_type)
  n = 12
  noises = step_noises(prng_key(), n)
  _, ref = run_diffusers("ddim", config, NOISE, n, monkeypatch, noises=noises, eta=eta)
  _, ours, _ = run_ours("ddim", config, NOISE, n, prng_key(), eta=eta)
  for a, b in zip(ours, ref):
    assert_close(a, b)


@pytest.mark.parametrize("name", [s for s in samplers.SAMPLERS if s != "heun"])  # diffusers' Heun lacks it
def test_zero_terminal_snr_matches_diffusers(name, monkeypatch):
  config = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
  n = 8
  noises = step_noises(prng_key(), n)
  sched, ref = run_diffusers(name, config, NOISE, n, monkeypatch, noises=noises)
  plan, ours, _ = run_ours(name, config, NOISE, n, prng_key())
  check_plan(plan, sched, name)
  assert plan.timesteps[0] == 999
  # Euler's first step goes from sigma = 4096 to ~10: in float32 the reference keeps only ~3e-5 of the state.
  rtol = 1e-4 if name in samplers.VE_STATE_SAMPLERS else 1e-5
  for a, b in zip(ours, ref):
    assert_close(a, b, rtol)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras"])
def test_dpm_solver_long_schedule_matches_diffusers(name, monkeypatch):
  """25 steps: second-order steps throughout, first order only at both ends."""
  config = SchedulerConfig(prediction_type="epsilon")
  sched, ref = run_diffusers(name, config, NOISE, 25, monkeypatch)
  plan, ours, _ = run_ours(name, config, NOISE, 25, None)
  check_plan(plan, sched, name)
  for a, b in zip(ours, ref):
    assert_close(a, b)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras"])
def test_img2img_matches_diffusers(name, monkeypatch):
  config = SchedulerConfig(prediction_type="epsilon")
  n, strength = 10, 0.55
  start = samplers.img2img_start_step(n, strength)
  assert start == 5  # diffusers: init_timestep = int(10 * 0.55) = 5
  init = np.random.RandomState(2).randn(*SHAPE).astype(np.float32)
  noises = step_noises(prng_key(), n)
  _, ref = run_diffusers(name, config, NOISE, n, monkeypatch, noises=noises, start_step=start, init_latents=init)
  _, ours, out = run_ours(name, config, NOISE, n, prng_key(), start_step=start, init_latents=init)
  assert len(ours) == len(ref) == n - start
  for a, b in zip(ours, ref):
    assert_close(a, b)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_inpainting_matches_diffusers(name, monkeypatch):
  config = SchedulerConfig(prediction_type="v_prediction")
  n = 8
  init = np.random.RandomState(3).randn(*SHAPE).astype(np.float32)
  mask = (np.random.RandomState(4).rand(*SHAPE[:3], 1) > 0.5).astype(np.float32)  # 1 = repaint
  _, ref = run_diffusers(name, config, NOISE, n, monkeypatch, init_latents=init, mask=mask)
  plan = samplers.make_plan(name, config, n)
  blend = samplers.inpaint_post_step(plan, jnp.asarray(init), jnp.asarray(NOISE), jnp.asarray(mask))
  _, ours, out = run_ours(name, config, NOISE, n, prng_key(), post_step=lambda x, i: record_state(blend(x, i), i))
  for a, b in zip(ours, ref):
    assert_close(a, b)
  np.testing.assert_array_equal(out[mask[..., 0] == 0], init[mask[..., 0] == 0])  # known region is exact


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "dpmpp_2m_karras"])
def test_noise_to_step_matches_add_noise(name):
  config = SchedulerConfig(timestep_spacing="trailing")
  n = 6
  plan = samplers.make_plan(name, config, n)
  sched = make_scheduler(name, config)
  sched.set_timesteps(n)
  x0 = np.random.RandomState(5).randn(*SHAPE).astype(np.float32)
  for i in range(n):
    t = sched.timesteps[i * sched.order]
    if hasattr(sched, "set_begin_index"):
      sched.set_begin_index(i * sched.order)
    ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(NOISE), t[None]).numpy()
    assert_close(samplers.noise_to_step(x0, NOISE, plan, i), ref)
  np.testing.assert_array_equal(samplers.noise_to_step(x0, NOISE, plan, n), x0)


def levels_lookup(plan):
  """(alpha, sigma) at the model times the plan visits, so a model can convert between parametrisations."""
  times = np.concatenate([plan.timesteps, plan.timesteps_next[:-1]])
  alphas = np.concatenate([plan.alpha, plan.alpha_next[:-1]])
  sigmas = np.concatenate([plan.sigma, plan.sigma_next[:-1]])

  def lookup(t):  # [B] -> [B], [B]
    idx = jnp.argmin(jnp.abs(jnp.asarray(times)[None, :] - t[:, None]), axis=1)
    return jnp.asarray(alphas)[idx], jnp.asarray(sigmas)[idx]

  return lookup


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_every_parametrisation_gives_the_same_samples(name):
  """A model that outputs v or x0 samples exactly like the equivalent eps model."""
  n = 7
  results = {}
  for prediction_type in ("epsilon", "v_prediction", "sample"):
    config = SchedulerConfig(prediction_type=prediction_type)
    plan = samplers.make_plan(name, config, n)
    lookup = levels_lookup(plan)

    def model(x, t):
      alpha, sigma = lookup(t)
      return losses.convert(jax_model(x, t), x, alpha, sigma, "epsilon", prediction_type)

    results[prediction_type] = np.asarray(jax.jit(lambda z: samplers.sample(name, model, z, plan, prng_key()))(NOISE))
  assert_close(results["v_prediction"], results["epsilon"], rtol=2e-5)
  assert_close(results["sample"], results["epsilon"], rtol=2e-5)


def test_api_errors():
  config = SchedulerConfig()
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.make_plan("plms", config, 10)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.make_plan("ddim", config, 0)
  plan = samplers.make_plan("euler_a", config, 4)
  with pytest.raises(ValueError, match="PRNG key"):
    samplers.sample("euler_a", jax_model, NOISE, plan, None)
  with pytest.raises(ValueError, match="does not match"):
    samplers.sample("euler", jax_model, NOISE, plan, prng_key())


def test_plan_is_a_pytree_that_jit_accepts():
  """Passing the plan as a jit argument (traced arrays, static metadata) gives the same result."""
  config = SchedulerConfig()
  plan = samplers.make_plan("dpmpp_2m", config, 6)
  closed = jax.jit(lambda z: samplers.sample("dpmpp_2m", jax_model, z, plan))(NOISE)
  traced = jax.jit(lambda z, p: samplers.sample("dpmpp_2m", jax_model, z, p))(NOISE, plan)
  np.testing.assert_allclose(np.asarray(traced), np.asarray(closed), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, start_step, inpaint", [("dpmpp_2m", 0, False), ("euler_a", 2, False),
                                                       ("heun", 0, True), ("ddpm", 3, True)])
def test_one_step_at_a_time_gives_the_same_samples(name, start_step, inpaint):
  """initial_state + run_steps one step per call (traced step index) = sample's single scan."""
  n = 6
  plan = samplers.make_plan(name, SchedulerConfig(), n)
  x0 = np.asarray(NOISE) * 0.3 + 0.1
  mask = (np.arange(SHAPE[2]) < 2).astype(np.float32).reshape(1, 1, -1, 1)
  post_step = samplers.inpaint_post_step(plan, x0, NOISE, mask) if inpaint else None
  init = None if inpaint else x0
  whole = jax.jit(lambda z: samplers.sample(name, jax_model, z, plan, prng_key(), start_step=start_step,
                                            init_latents=init, post_step=post_step))(NOISE)
  one_step = jax.jit(lambda state, i: samplers.run_steps(name, jax_model, state, plan, prng_key(), first=i, count=1,
                                                         post_step=post_step))
  state = samplers.initial_state(name, NOISE, plan, start_step=start_step, init_latents=init)
  for i in range(start_step, n):
    state = one_step(state, np.int32(i))
  assert_close(np.asarray(state[0]), np.asarray(whole), rtol=1e-5)
  # A static first step and count: the last steps on their own, from the state before them.
  state = samplers.initial_state(name, NOISE, plan, start_step=start_step, init_latents=init)
  state = samplers.run_steps(name, jax_model, state, plan, prng_key(), first=start_step, count=2, post_step=post_step)
  state = samplers.run_steps(name, jax_model, state, plan, prng_key(), first=start_step + 2, post_step=post_step)
  assert_close(np.asarray(state[0]), np.asarray(whole), rtol=1e-5)


def test_run_steps_errors():
  plan = samplers.make_plan("ddim", SchedulerConfig(), 4)
  state = samplers.initial_state("ddim", NOISE, plan)
  with pytest.raises(ValueError, match="2 steps from step 3 do not fit the plan.s 4 steps"):
    samplers.run_steps("ddim", jax_model, state, plan, first=3, count=2)
  with pytest.raises(ValueError, match="count is needed"):
    jax.jit(lambda i: samplers.run_steps("ddim", jax_model, state, plan, first=i))(np.int32(0))
  with pytest.raises(ValueError, match="start_step must be in"):
    samplers.initial_state("ddim", NOISE, plan, start_step=5)
