"""End to end against diffusers' StableDiffusionPipeline on tiny random weights saved with save_pretrained."""
import json
import os

import numpy as np
import pytest
import torch

from tests.sd_fixtures import build_sd_directory

PROMPTS = ["a photo of a red cat on the left", "a painting of an astronaut riding a horse"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd_dir(request, tmp_path_factory):
  return build_sd_directory(str(tmp_path_factory.mktemp(request.param)), style=request.param)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_same_images_as_diffusers(sd_dir, sampler):
  import diffusers

  import diffusion_jax as dj
  ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
  sched_cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
               "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[sampler]
  ref.scheduler = sched_cls.from_config(ref.scheduler.config)
  noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW, as diffusers wants
  with torch.no_grad():
    want = ref(PROMPTS, num_inference_steps=10, guidance_scale=7.5, latents=torch.from_numpy(noise),
               negative_prompt=["", "blue"], output_type="np").images  # [N, H, W, 3] in [0, 1]

  pipe = dj.Pipeline.from_pretrained(sd_dir)
  got = pipe(PROMPTS, ["", "blue"], num_inference_steps=10, guidance_scale=7.5, sampler=sampler,
             latents=noise.transpose(0, 2, 3, 1), output_type="np")
  assert got.shape == want.shape == (2, 16, 16, 3)
  assert np.abs(got - want).max() <= 2 / 255, np.abs(got - want).max()
  # And the uint8 output is the rounded float output.
  as_uint8 = pipe(PROMPTS, ["", "blue"], num_inference_steps=10, guidance_scale=7.5, sampler=sampler,
                  latents=noise.transpose(0, 2, 3, 1))
  assert as_uint8.dtype == np.uint8
  np.testing.assert_array_equal(as_uint8, np.round(got * 255).astype(np.uint8))


def test_loads_components_and_round_trips(sd_dir, tmp_path):
  import diffusion_jax as dj
  from flax.traverse_util import flatten_dict as flatten
  pipe = dj.Pipeline.from_pretrained(sd_dir)
  assert set(pipe.params) == {"text_encoder", "vae", "unet"}
  pipe.save_pretrained(tmp_path / "export")
  again = dj.Pipeline.from_pretrained(tmp_path / "export")
  a, b = flatten(pipe.params), flatten(again.params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  np.testing.assert_array_equal(pipe.tokenizer(PROMPTS), again.tokenizer(PROMPTS))
  # diffusers itself loads the export.
  import diffusers
  ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "export", safety_checker=None,
                                                          requires_safety_checker=False)
  assert sum(p.numel() for p in ref.unet.parameters()) == sum(np.size(v) for v in flatten(pipe.params["unet"]).values())


def test_a_directory_with_only_a_unet_loads_it(sd_dir, tmp_path):
  import shutil

  import diffusion_jax as dj
  shutil.copytree(os.path.join(sd_dir, "unet"), tmp_path / "unet")
  pipe = dj.Pipeline.from_pretrained(tmp_path)
  assert set(pipe.params) == {"unet"} and pipe.vae is None and pipe.tokenizer is None
  with pytest.raises(ValueError, match="without"):
    pipe("a cat")


def test_pickle_weights_are_refused_unless_allowed(sd_dir, tmp_path):
  import shutil

  import diffusion_jax as dj
  from safetensors.torch import load_file
  shutil.copytree(os.path.join(sd_dir, "unet"), tmp_path / "unet")
  weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
  torch.save(load_file(weights), tmp_path / "unet" / "diffusion_pytorch_model.bin")
  weights.unlink()
  with pytest.raises(dj.UnsafeCheckpointError, match="allow_pickle=True"):
    dj.Pipeline.from_pretrained(tmp_path)
  pipe = dj.Pipeline.from_pretrained(tmp_path, allow_pickle=True)
  assert "unet" in pipe.params


def test_sharded_safetensors_with_index(sd_dir, tmp_path):
  import shutil

  import diffusion_jax as dj
  from safetensors.torch import load_file, save_file
  shutil.copytree(os.path.join(sd_dir, "unet"), tmp_path / "unet")
  weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
  state = load_file(weights)
  weights.unlink()
  keys = sorted(state)
  half = len(keys) // 2
  weight_map = {}
  for i, part in enumerate((keys[:half], keys[half:])):
    name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
    save_file({k: state[k] for k in part}, tmp_path / "unet" / name)
    weight_map.update({k: name for k in part})
  with open(tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  sharded = dj.Pipeline.from_pretrained(tmp_path)
  whole = dj.Pipeline.from_pretrained(sd_dir)
  from flax.traverse_util import flatten_dict as flatten
  for k, v in flatten(whole.params["unet"]).items():
    np.testing.assert_array_equal(np.asarray(flatten(sharded.params["unet"])[k]), np.asarray(v))


def test_mis_shaped_tensor_names_key_and_shapes(sd_dir, tmp_path):
  import shutil

  import diffusion_jax as dj
  from safetensors.torch import load_file, save_file
  shutil.copytree(os.path.join(sd_dir, "unet"), tmp_path / "unet")
  weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
  state = load_file(weights)
  state["conv_in.weight"] = torch.zeros(32, 4, 5, 5)
  del state["conv_out.bias"]
  save_file(state, weights)
  with pytest.raises(dj.WeightMismatchError) as e:
    dj.Pipeline.from_pretrained(tmp_path)
  assert "conv_in.weight" in str(e.value) and "(5, 5, 4, 32)" in str(e.value) and "(3, 3, 4, 32)" in str(e.value)
  assert "conv_out/bias" in str(e.value)


@pytest.mark.slow
def test_img2img_and_inpainting(sd_dir):
  import diffusion_jax as dj
  pipe = dj.Pipeline.from_pretrained(sd_dir)
  init = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
  out = pipe("a cat", image=init, strength=0.5, num_inference_steps=4, sampler="ddim", output_type="np")
  assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
  mean, _ = pipe.vae.apply({"params": pipe.params["vae"]}, init[None] / 127.5 - 1.0, method="encode")
  roundtrip = np.clip(np.asarray(pipe.vae.apply({"params": pipe.params["vae"]}, mean, method="decode")) / 2 + 0.5, 0, 1)
  # An empty mask keeps every latent of the init image: the output is its VAE round trip.
  kept = pipe("a cat", image=init, mask=np.zeros((16, 16)), num_inference_steps=4, sampler="ddim",
              output_type="np")
  np.testing.assert_allclose(kept, roundtrip, atol=1e-5)
  mask = np.zeros((16, 16), np.float32)
  mask[:, :8] = 1
  inpainted = pipe("a cat", image=init, mask=mask, num_inference_steps=4, sampler="ddim", output_type="np")
  assert inpainted.shape == (1, 16, 16, 3) and np.abs(inpainted - roundtrip).max() > 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="plms"), "unknown sampler 'plms'; choose one of ddpm, ddim"),
    (dict(height=15, width=16), "multiples of 2"),
    (dict(mask=np.ones((16, 16))), "needs `image`"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), mask=np.ones((8, 8))), "mask is 8x8 but the image is 16x16"),
    (dict(image="/nonexistent.png"), "cannot read init image"),
    (dict(latents=np.zeros((1, 4, 4, 4))), "latents must have shape"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), strength=0.0), "strength"),
])
def test_bad_input_is_a_clear_error(sd_dir, kwargs, message):
  import diffusion_jax as dj
  pipe = dj.Pipeline.from_pretrained(sd_dir)
  with pytest.raises(ValueError, match=message):
    pipe("a cat", num_inference_steps=2, **kwargs)


def test_over_long_prompt_is_truncated_with_a_warning(sd_dir):
  import diffusion_jax as dj
  pipe = dj.Pipeline.from_pretrained(sd_dir)
  long_prompt = " ".join(["red cat"] * 60)
  with pytest.warns(UserWarning, match="Truncated 1 text"):
    context = pipe.encode_prompt([long_prompt])
  assert context.shape == (1, 77, 32)


@pytest.mark.parametrize("kwargs", [dict(sampler="dpmpp_2m", guidance_rescale=0.7),
                                    dict(sampler="euler_a", image="init", strength=0.5),
                                    dict(sampler="ddim", image="init", mask="left")])
@pytest.mark.slow
def test_progress_bar_steps_give_the_same_images(sd_dir, kwargs, capsys):
  """progress=True runs one jitted step at a time (no host callback); the images are the same."""
  import diffusion_jax as dj
  pipe = dj.Pipeline.from_pretrained(sd_dir)
  kwargs = dict(kwargs)  # the parameter's dict is shared by both model directories
  if kwargs.get("image") == "init":
    kwargs["image"] = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
  if kwargs.get("mask") == "left":
    kwargs["mask"] = (np.arange(16) < 8).astype(np.float32)[None, :].repeat(16, 0)
  common = dict(num_inference_steps=4, num_images=2, seed=3, output_type="np", **kwargs)
  whole = pipe(["a cat", "a dog"], **common)
  capsys.readouterr()
  stepped = pipe(["a cat", "a dog"], progress=True, **common)
  np.testing.assert_allclose(stepped, whole, atol=2e-5)
  steps = 2 if "strength" in kwargs else 4  # img2img at strength 0.5 runs the last half
  err = capsys.readouterr().err
  assert "sampling: 100%" in err and f"{steps}/{steps}" in err, err[-500:]
