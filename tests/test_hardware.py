"""hardware.choices / configure: implementation choices made from the devices a program runs on."""
import dataclasses
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from diffusion_jax import hardware
from diffusion_jax.nn import autoencoder as ae
from diffusion_jax.nn import cpu_attention
from diffusion_jax.nn.unet import TINY, UNetConfig

CPU, GPU, TPU = (SimpleNamespace(platform=p) for p in ("cpu", "gpu", "tpu"))


def test_one_cpu_device_in_float32_runs_the_kernel_where_it_builds():
  chosen = hardware.choices([CPU], jnp.float32)
  assert chosen["attention"] == ("cpu_kernel" if cpu_attention.available() else "cpu_tiles")
  assert chosen["ff_chunk_elements"] > 0 and chosen["upsample_conv_min_side"] > 0  # CPU cache and conv forms


@pytest.mark.parametrize("devices,dtype", [([CPU, CPU], jnp.float32), ([CPU], jnp.bfloat16), ([CPU], "float16")])
def test_several_cpu_devices_or_16_bits_run_the_tiles(devices, dtype):
  # The kernel's custom call has no sharding rule, and it computes in float32 only.
  chosen = hardware.choices(devices, dtype)
  assert chosen["attention"] == "cpu_tiles"
  assert chosen == {**hardware.choices([CPU]), "attention": "cpu_tiles"}


def test_gpus_get_cudnn_and_others_xla_without_the_cpu_forms():
  assert hardware.choices([GPU, GPU], jnp.bfloat16) == {"attention": "cudnn", "ff_chunk_elements": 0,
                                                        "upsample_conv_min_side": 0}
  assert hardware.choices([TPU], jnp.bfloat16) == {"attention": "xla", "ff_chunk_elements": 0,
                                                   "upsample_conv_min_side": 0}
  with pytest.raises(ValueError, match="no devices"):
    hardware.choices([])


def test_configure_resolves_auto_fields_only_unless_forced():
  cfg = dataclasses.replace(TINY, attention="auto", upsample_conv_min_side=3)
  got = hardware.configure(cfg, [GPU], jnp.bfloat16)
  assert got == dataclasses.replace(TINY, attention="cudnn", upsample_conv_min_side=3)
  forced = hardware.configure(cfg, [GPU], jnp.bfloat16, force=True)
  assert forced == dataclasses.replace(TINY, attention="cudnn", upsample_conv_min_side=0, ff_chunk_elements=0)
  # Nothing to choose: the same config, and the devices are not even looked at.
  assert hardware.configure(TINY, []) is TINY


def test_configure_sets_the_fields_each_config_has():
  vae = hardware.configure(dataclasses.replace(ae.TINY, attention="auto", upsample_conv_min_side="auto"), [TPU])
  assert (vae.attention, vae.upsample_conv_min_side) == ("xla", 0)
  assert not hasattr(vae, "ff_chunk_elements")
  unet = hardware.configure(UNetConfig(attention="auto", ff_chunk_elements="auto", upsample_conv_min_side="auto"),
                            [CPU, CPU])
  assert (unet.attention, unet.ff_chunk_elements) == ("cpu_tiles", hardware.choices([CPU])["ff_chunk_elements"])
