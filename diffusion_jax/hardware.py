"""Implementation choices for the devices a program runs on, as model config fields.

How the models run (not what they compute) depends on the hardware: which attention implementation,
whether the feed-forward runs in chunks of rows, which form the upsamplers take. These are fields of
`UNetConfig` (`attention`, `ff_chunk_elements`, `upsample_conv_min_side`) and `AutoencoderConfig`
(`attention`, `upsample_conv_min_side`); the modules never look at the hardware themselves. Callers
choose them here, once, from the devices the program will run on:

  cfg = hardware.configure(cfg, jax.devices(), jnp.float32)              # the fields set to "auto"
  cfg = hardware.configure(cfg, jax.devices(), jnp.bfloat16, force=True)  # every choice field

Rule: `configure` replaces the choice fields of `config` whose value is "auto" (a run config's
value, which the modules refuse); with `force=True`, all of its choice fields (for configs read from
elsewhere, e.g. diffusers' config.json, which hold the plain defaults).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax.nn import cpu_attention

# Config fields that say how a model runs on its devices; a config has those of them that it uses.
FIELDS = ("attention", "ff_chunk_elements", "upsample_conv_min_side")
AUTO = "auto"

# CPU feed-forward chunks of [rows, 2 x inner] float32 GEGLU activations this size (2 MiB) stay in the
# caches instead of going out to memory (benchmarks/unet.py measures the difference).
CPU_FF_CHUNK_ELEMENTS = 1 << 19
# From 16x16 inputs on, XLA's CPU convolutions beat the four per-phase matmuls despite the 2x2 form's
# unused border; at 8x8 they lose from 128 channels on (benchmarks/upsample.py).
CPU_UPSAMPLE_CONV_MIN_SIDE = 16
_GPU_PLATFORMS = ("gpu", "cuda")


def choices(devices: Sequence[Any] | None = None, dtype=jnp.float32, *,
            build: cpu_attention.BuildSettings | None = None) -> dict:
  """The choice fields' values for a program on `devices` (default `jax.devices()`) computing in `dtype`.

  CPU: the fused attention kernel ("cpu_kernel") on one device in float32 where it builds (with
  `build`; this builds it once per machine), else the tiles ("cpu_tiles": the kernel's custom call
  has no sharding rule); the feed-forward in cache-sized chunks; 2x2-convolution upsampling from
  CPU_UPSAMPLE_CONV_MIN_SIDE. NVIDIA GPU: cuDNN's fused attention (16-bit; the model falls back to
  XLA's where it has none), the feed-forward in one piece, matmul upsampling. Others (TPU): XLA's.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("hardware.choices: no devices")
  platforms = {d.platform for d in devices}
  if platforms == {"cpu"}:
    kernel = len(devices) == 1 and jnp.dtype(dtype) == jnp.float32 and cpu_attention.available(build)
    return {"attention": "cpu_kernel" if kernel else "cpu_tiles", "ff_chunk_elements": CPU_FF_CHUNK_ELEMENTS,
            "upsample_conv_min_side": CPU_UPSAMPLE_CONV_MIN_SIDE}
  attention = "cudnn" if platforms <= set(_GPU_PLATFORMS) else "xla"
  return {"attention": attention, "ff_chunk_elements": 0, "upsample_conv_min_side": 0}


def configure(config, devices: Sequence[Any] | None = None, dtype=jnp.float32, *, force: bool = False,
              build: cpu_attention.BuildSettings | None = None):
  """`config` (a model config dataclass) with its "auto" choice fields, or with `force` all of them,
  chosen by `choices(devices, dtype, build=build)`; `config` itself where there is nothing to choose."""
  names = [name for name in FIELDS
           if hasattr(config, name) and (force or _is_auto(getattr(config, name)))]
  if not names:
    return config
  chosen = choices(devices, dtype, build=build)
  return dataclasses.replace(config, **{name: chosen[name] for name in names})


def _is_auto(value) -> bool:
  return isinstance(value, str) and value == AUTO
