"""Diffusion math as pure functions: noise schedules, parametrisations and losses, guidance, samplers."""
from diffusion_jax.diffusion import guidance, losses, samplers, schedules
from diffusion_jax.diffusion.samplers import SAMPLERS, SamplerPlan, img2img_start_step, make_plan, noise_to_step, sample
from diffusion_jax.diffusion.schedules import SchedulerConfig

__all__ = [
    "guidance", "losses", "samplers", "schedules", "SAMPLERS", "SamplerPlan", "SchedulerConfig",
    "img2img_start_step", "make_plan", "noise_to_step", "sample",
]
