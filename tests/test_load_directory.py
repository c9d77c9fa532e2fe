"""`load_directory`: the one loader of diffusers-format and training-run directories."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from tests.sd_fixtures import build_sd_directory


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  return build_sd_directory(str(tmp_path_factory.mktemp("sd1")))


def _reference_state(sd_dir, name, stem="diffusion_pytorch_model"):
  from safetensors.numpy import load_file
  return load_file(os.path.join(sd_dir, name, f"{stem}.safetensors"))


def test_whole_directory_matches_the_files(sd_dir):
  from diffusion_jax.convert import diffusers as dconv
  from flax.traverse_util import flatten_dict as flatten
  loaded = dconv.load_directory(sd_dir)
  assert loaded.path == sd_dir and loaded.class_name == "StableDiffusionPipeline"
  assert sorted(loaded.params) == sorted(loaded.modules) == sorted(loaded.configs) == ["text_encoder", "unet", "vae"]
  assert loaded.tokenizer is not None and loaded.scheduler.beta_schedule == "scaled_linear"
  unet = flatten(loaded.params["unet"])
  state = _reference_state(sd_dir, "unet")
  # A conv kernel, a dense kernel, a norm scale and a bias, each in the Flax layout.
  np.testing.assert_array_equal(unet[("conv_in", "kernel")], state["conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(unet[("time_embedding", "linear_1", "kernel")], state["time_embedding.linear_1.weight"].T)
  np.testing.assert_array_equal(unet[("conv_norm_out", "scale")], state["conv_norm_out.weight"])
  np.testing.assert_array_equal(unet[("conv_out", "bias")], state["conv_out.bias"])
  text = flatten(loaded.params["text_encoder"])
  tstate = _reference_state(sd_dir, "text_encoder", "model")
  token_key = next(k for k in tstate if k.endswith("embeddings.token_embedding.weight"))  # "text_model." or not
  np.testing.assert_array_equal(text[("embeddings", "token_embedding", "embedding")], tstate[token_key])
  # Every tensor of the files arrived, on the device, in the modules' parameter dtype.
  import jax
  leaves = jax.tree.leaves(loaded.params)
  assert all(isinstance(x, jax.Array) and x.dtype == np.float32 for x in leaves)


def test_only_unet_loads_alone_and_requests_name_what_is_missing(sd_dir, tmp_path):
  from diffusion_jax.convert import diffusers as dconv
  shutil.copytree(os.path.join(sd_dir, "unet"), tmp_path / "unet")
  loaded = dconv.load_directory(tmp_path)
  assert list(loaded.params) == ["unet"] and loaded.tokenizer is None and loaded.class_name is None
  assert loaded.scheduler is not None  # the default schedule
  with pytest.raises(FileNotFoundError, match=r"has no vae/, tokenizer/ \(it holds unet/\)"):
    dconv.load_directory(tmp_path, ["unet", "vae", "tokenizer"])
  with pytest.raises(ValueError, match="unknown components"):
    dconv.load_directory(tmp_path, ["unet", "safety_checker"])


def test_training_run_directory_loads_its_model(sd_dir, tmp_path):
  from diffusion_jax.convert import diffusers as dconv
  run = tmp_path / "run"
  os.makedirs(run / "checkpoints")
  shutil.copytree(sd_dir, run / "model")
  loaded = dconv.load_directory(run, ["unet", "scheduler"])
  assert loaded.path == str(run / "model") and list(loaded.params) == ["unet"]
  assert loaded.class_name == "StableDiffusionPipeline"


def test_missing_everything_is_a_clear_error(tmp_path):
  from diffusion_jax.convert import diffusers as dconv
  with pytest.raises(FileNotFoundError, match="neither a diffusers-format directory"):
    dconv.load_directory(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    dconv.load_directory(tmp_path / "nowhere")
  os.makedirs(tmp_path / "vae")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    dconv.load_directory(tmp_path)


def test_weights_that_do_not_fit_name_the_keys(sd_dir, tmp_path):
  import diffusion_jax as dj
  from diffusion_jax.convert import diffusers as dconv
  from safetensors.torch import load_file, save_file
  shutil.copytree(os.path.join(sd_dir, "text_encoder"), tmp_path / "text_encoder")
  weights = tmp_path / "text_encoder" / "model.safetensors"
  state = load_file(weights)
  prefix = "text_model." if "text_model.final_layer_norm.weight" in state else ""
  state[prefix + "final_layer_norm.weight"] = torch.zeros(7)
  state[prefix + "extra.weight"] = torch.zeros(3, 3)
  del state[prefix + "encoder.layers.0.mlp.fc1.bias"]
  save_file(state, weights)
  with pytest.raises(dj.WeightMismatchError) as e:
    dconv.load_directory(tmp_path)
  message = str(e.value)
  assert "final_layer_norm.weight: checkpoint (7,)" in message and "extra.weight" in message
  assert "encoder/layers_0/mlp/fc1/bias" in message


def test_pickle_weights_need_consent(sd_dir, tmp_path):
  from diffusion_jax.convert import diffusers as dconv
  shutil.copytree(os.path.join(sd_dir, "vae"), tmp_path / "vae")
  from safetensors.torch import load_file
  weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
  torch.save(load_file(weights), tmp_path / "vae" / "diffusion_pytorch_model.bin")
  os.remove(weights)
  with pytest.raises(dconv.UnsafeCheckpointError, match="allow_pickle"):
    dconv.load_directory(tmp_path)
  from flax.traverse_util import flatten_dict as flatten
  loaded = flatten(dconv.load_directory(tmp_path, allow_pickle=True).params["vae"])
  with open(os.path.join(sd_dir, "vae", "config.json")) as f:
    assert json.load(f)["latent_channels"] == 4
  state = _reference_state(sd_dir, "vae")
  np.testing.assert_array_equal(loaded[("decoder", "conv_out", "bias")], state["decoder.conv_out.bias"])


def test_half_precision_files_load_into_float32_params(sd_dir, tmp_path):
  from safetensors.numpy import load_file, save_file

  from diffusion_jax.convert import diffusers as dconv
  from flax.traverse_util import flatten_dict as flatten
  shutil.copytree(os.path.join(sd_dir, "unet"), tmp_path / "unet")
  weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
  half = {k: v.astype(np.float16) for k, v in load_file(weights).items()}
  save_file(half, weights)
  got = flatten(dconv.load_directory(tmp_path).params["unet"])
  assert got[("conv_in", "kernel")].dtype == np.float32
  np.testing.assert_array_equal(got[("conv_in", "kernel")], half["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0))


def test_parameter_shapes_are_cached_and_a_bad_cache_is_ignored(sd_dir, tmp_path, monkeypatch):
  from diffusion_jax.convert import diffusers as dconv
  monkeypatch.setenv("DIFFUSION_JAX_SHAPE_CACHE", str(tmp_path / "shapes"))
  first = dconv.load_directory(sd_dir, ["vae"]).params
  files = os.listdir(tmp_path / "shapes")
  assert len(files) == 1 and files[0].startswith("vae-")
  second = dconv.load_directory(sd_dir, ["vae"]).params  # shapes read back, not traced
  import jax
  assert jax.tree.structure(first) == jax.tree.structure(second)
  (tmp_path / "shapes" / files[0]).write_text("[[\"garbage")
  third = dconv.load_directory(sd_dir, ["vae"]).params
  assert jax.tree.structure(third) == jax.tree.structure(first)
