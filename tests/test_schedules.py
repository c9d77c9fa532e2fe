"""Noise schedules, timestep spacings and the scheduler config against diffusers."""
import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as torch_rescale_zero_terminal_snr

from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.schedules import SchedulerConfig

SCHEDULES = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
def test_betas_and_alphas_cumprod_match_diffusers(schedule, zero_snr):
  config = SchedulerConfig(rescale_betas_zero_snr=zero_snr, **schedule)
  ref = diffusers.DDPMScheduler.from_config(config.to_dict())
  euler = diffusers.EulerDiscreteScheduler.from_config(config.to_dict())
  ref_sigmas = euler.sigmas.numpy()[:-1][::-1]  # with the 2**-24 terminal clamp under zero SNR
  if not zero_snr:  # the same float32 arithmetic: equal to rounding
    np.testing.assert_allclose(schedules.betas(config), ref.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(schedules.alphas_cumprod(config), ref.alphas_cumprod.numpy(), rtol=1e-6)
    np.testing.assert_allclose(schedules.train_sigmas(config), ref_sigmas, rtol=2e-6)
    return
  # The rescale takes float32 square roots, which torch rounds differently on some CPUs (1 ulp): compare
  # what is well conditioned, betas = 1 - alpha and alphas_cumprod, to a few ulp of 1.
  np.testing.assert_allclose(schedules.betas(config), ref.betas.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(schedules.alphas_cumprod(config), ref.alphas_cumprod.numpy(), rtol=5e-5, atol=5e-7)
  assert schedules.alphas_cumprod(config)[-1] == 0.0
  sigmas = schedules.train_sigmas(config)
  np.testing.assert_allclose(1 / (1 + sigmas**2), 1 / (1 + ref_sigmas**2), rtol=5e-5, atol=5e-7)
  np.testing.assert_allclose([sigmas[-1], ref_sigmas[-1]], np.sqrt(2.0**24 - 1), rtol=1e-7)


def test_rescale_zero_terminal_snr_matches_diffusers_and_the_paper():
  betas = schedules.betas(SchedulerConfig())
  ours = schedules.rescale_zero_terminal_snr(betas)
  ref = torch_rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)  # betas = 1 - ratio: float32 cancellation
  # Algorithm 1 of Lin et al.: sqrt(alphas_cumprod) keeps its first value and ends at exactly 0.
  before = np.sqrt(np.cumprod(1 - betas.astype(np.float64)))
  after = np.sqrt(np.cumprod(1 - ours.astype(np.float64)))
  np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
  assert after[-1] == 0.0
  # ... and is an affine function of the original.
  np.testing.assert_allclose(after, (before - before[-1]) * before[0] / (before[0] - before[-1]), atol=1e-5)


@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 10, 20, 50, 333])
def test_timesteps_match_diffusers(spacing, num_steps):
  config = SchedulerConfig(timestep_spacing=spacing)
  for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
    ref = cls.from_config(config.to_dict())
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(schedules.spaced_timesteps(config, num_steps), ref.timesteps.numpy())
  euler = diffusers.EulerDiscreteScheduler.from_config(config.to_dict())
  euler.set_timesteps(num_steps)
  ours = schedules.spaced_timesteps(config, num_steps, round_linspace=False)
  np.testing.assert_array_equal(ours, euler.timesteps.numpy())
  sigmas = schedules.interp_sigmas(ours, schedules.train_sigmas(config)).astype(np.float32)
  np.testing.assert_allclose(sigmas, euler.sigmas.numpy()[:-1], rtol=2e-6)
  dpm = diffusers.DPMSolverMultistepScheduler.from_config(config.to_dict())
  dpm.set_timesteps(num_steps)
  np.testing.assert_array_equal(schedules.dpm_solver_timesteps(config, num_steps), dpm.timesteps.numpy())


def test_spacings_follow_their_definitions():
  """SD's "leading" with steps_offset 1 and "trailing" (Lin et al. table 2) for 10 of 1000 timesteps."""
  np.testing.assert_array_equal(schedules.spaced_timesteps(SchedulerConfig(), 10), np.arange(901, 0, -100))
  trailing = SchedulerConfig(timestep_spacing="trailing")
  np.testing.assert_array_equal(schedules.spaced_timesteps(trailing, 10), np.arange(999, 0, -100))
  linspace = SchedulerConfig(timestep_spacing="linspace")
  np.testing.assert_array_equal(schedules.spaced_timesteps(linspace, 4), [999, 666, 333, 0])
  with pytest.raises(ValueError):
    schedules.spaced_timesteps(SchedulerConfig(), 1001)


def test_karras_sigmas_and_sigma_to_t():
  sigmas = schedules.karras_sigmas(0.03, 14.6, 8)
  assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
  # Equal steps in sigma ** (1 / rho).
  np.testing.assert_allclose(np.diff(sigmas ** (1 / 7)), np.diff(sigmas ** (1 / 7))[0], rtol=1e-9)
  train = schedules.train_sigmas(SchedulerConfig())
  log_sigmas = np.log(train)
  # sigma_to_t inverts the training sigmas at integer timesteps and interpolates log-sigma in between.
  np.testing.assert_allclose(schedules.sigma_to_t(train[[0, 10, 500, 999]], log_sigmas), [0, 10, 500, 999], atol=1e-4)
  mid = np.exp((log_sigmas[10] + log_sigmas[11]) / 2)
  assert schedules.sigma_to_t(np.array([mid]), log_sigmas)[0] == pytest.approx(10.5, abs=1e-4)


def test_config_round_trips_through_diffusers(tmp_path):
  sd21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
          "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None, "some_future_key": 3}
  config = SchedulerConfig.from_dict(sd21)
  assert config.prediction_type == "v_prediction" and config.class_name == "DDIMScheduler"
  assert config.timestep_spacing == "leading"  # missing keys take SD's defaults
  d = config.to_dict()
  assert d["_class_name"] == "DDIMScheduler"
  path = tmp_path / "scheduler_config.json"
  path.write_text(json.dumps(d))
  assert SchedulerConfig.from_json_file(path) == config
  ref = diffusers.DDIMScheduler.from_pretrained(tmp_path)
  for key in ("prediction_type", "timestep_spacing", "steps_offset", "beta_schedule", "set_alpha_to_one",
              "clip_sample", "rescale_betas_zero_snr"):
    assert ref.config[key] == d[key], key
  assert diffusers.PNDMScheduler.from_config(SchedulerConfig().to_dict()).config.skip_prk_steps
  # A diffusers scheduler's own config (every init argument) reads back to the same values.
  euler = diffusers.EulerDiscreteScheduler.from_config(SchedulerConfig().to_dict())
  assert SchedulerConfig.from_dict(dict(euler.config)) == SchedulerConfig(class_name="EulerDiscreteScheduler")
  trained = SchedulerConfig.from_dict({"trained_betas": [0.1, 0.2]})
  assert trained.trained_betas == (0.1, 0.2) and hash(trained)
  np.testing.assert_array_equal(schedules.betas(trained), np.float32([0.1, 0.2]))


def test_config_rejects_unknown_values():
  with pytest.raises(ValueError, match="timestep_spacing"):
    SchedulerConfig(timestep_spacing="uniform")
  with pytest.raises(ValueError, match="prediction_type"):
    SchedulerConfig(prediction_type="score")
  with pytest.raises(ValueError, match="beta_schedule"):
    SchedulerConfig(beta_schedule="sigmoid")
