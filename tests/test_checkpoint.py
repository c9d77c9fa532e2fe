"""Tests of diffusion_jax.checkpoint: round trips, retention, crash and full-disk safety."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from diffusion_jax.checkpoint import (CheckpointMismatchError, Checkpointer, CheckpointSaveError,
                                      CHECKPOINT_SUBDIR)

sys.path.insert(0, os.path.dirname(__file__))
import checkpoint_worker  # noqa: E402  (tree_for_step: what the worker saved)

WORKER = os.path.join(os.path.dirname(__file__), "checkpoint_worker.py")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  """The 8-device worker (JAX reads the forced device count at import: a subprocess)."""
  tmp = tmp_path_factory.mktemp("sharded")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, WORKER, "sharded", str(tmp / "ckpt"),
                           "--out", str(tmp / "out.json")], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  yield proc, tmp / "out.json"
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"conv_in": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
          "out": {"kernel": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}}


def _abstract(tree):
  return jax.eval_shape(lambda: tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dataset():
  return grain.MapDataset.range(40).shuffle(seed=3).batch(4).to_iter_dataset()


# --------------------------------------------------------------------- round trip


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_of_every_component(tmp_path, async_save):
  params = _params()
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments, count 1
  ema = jax.tree.map(lambda x: 0.5 * x, params)
  config = ml_collections.ConfigDict({"lr": 1e-4, "mesh": {"data": -1, "fsdp": 2},
                                      "channels": (64, 128), "name": "tiny"})
  it = iter(_dataset())
  for _ in range(3):
    next(it)
  rng = jax.random.key(7)

  with Checkpointer(tmp_path / CHECKPOINT_SUBDIR, async_save=async_save) as ckpt:
    assert ckpt.save(3, {"unet": params, "opt_state": opt_state, "ema": ema}, rng=rng,
                     data_iterator=it, config=config)
    after_save = next(it)  # the loop goes on while the write runs in the background

  with Checkpointer.for_workdir(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3
    it2 = iter(_dataset())
    restored = ckpt.restore(abstract_items={"unet": _abstract(params),
                                            "opt_state": _abstract(opt_state),
                                            "ema": _abstract(ema)}, data_iterator=it2)
  assert restored.step == 3
  _assert_trees_equal(restored.items["unet"], params)
  _assert_trees_equal(restored.items["ema"], ema)
  _assert_trees_equal(restored.items["opt_state"], opt_state)
  assert isinstance(restored.items["opt_state"][0], optax.ScaleByAdamState)  # types preserved
  assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
  assert restored.config == json.loads(json.dumps(config.to_dict()))  # tuples become lists
  # The iterator continues exactly where it was when `save` was called.
  np.testing.assert_array_equal(next(it2), after_save)


def test_restore_without_targets_and_raw_keys(tmp_path):
  params = _params()
  raw_key = jax.random.PRNGKey(5)  # uint32[2], the legacy key format
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"vae": params, "unet": _params(1)}, rng=raw_key)
    restored = ckpt.restore()
    only_vae = ckpt.restore(abstract_items={"vae": _abstract(params)})
  _assert_trees_equal(restored.items["vae"], params)
  _assert_trees_equal(restored.items["unet"], _params(1))
  assert restored.rng.dtype == jnp.uint32
  np.testing.assert_array_equal(restored.rng, raw_key)
  assert restored.config is None
  assert set(only_vae.items) == {"vae"}
  assert only_vae.items["vae"]["conv_in"]["kernel"].shape == (3, 3, 4, 8)


def test_reserved_item_names_are_refused(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="reserved"):
      ckpt.save(1, {"config": _params()})


def test_restore_from_empty_directory_raises(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      ckpt.restore()


# ---------------------------------------------------------------------- retention


def test_max_to_keep_and_save_interval(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(step, {"unet": _params(step)}) for step in range(6)]
    assert saved == [True, False, True, False, True, False]
    assert ckpt.save(5, {"unet": _params(5)}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert sorted(os.listdir(tmp_path)) == ["4", "5"]
  with Checkpointer(tmp_path) as ckpt:
    _assert_trees_equal(ckpt.restore(4).items["unet"], _params(4))


def test_resume_picks_latest_complete_step(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"unet": _params(1)})
    ckpt.save(2, {"unet": _params(2)})
  # Leftovers of interrupted saves: orbax's temporary directory, and a step directory
  # whose files were copied only partly (no commit marker).
  shutil.copytree(tmp_path / "2", tmp_path / "4.orbax-checkpoint-tmp-1234")
  shutil.copytree(tmp_path / "2", tmp_path / "3")
  os.remove(tmp_path / "3" / "commit_success.txt")
  shutil.rmtree(tmp_path / "3" / "unet")
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 2
    restored = ckpt.restore()
    with pytest.raises(FileNotFoundError, match="step 3"):
      ckpt.restore(3)
    ckpt.save(5, {"unet": _params(5)})
    ckpt.wait()
    # Orbax removed the temporary directory (in the background, done before its first save).
    assert not (tmp_path / "4.orbax-checkpoint-tmp-1234").exists()
  assert restored.step == 2
  _assert_trees_equal(restored.items["unet"], _params(2))


# ------------------------------------------------------------------ crash safety


def test_sigkill_during_async_save_keeps_last_complete_checkpoint(tmp_path):
  proc = subprocess.Popen([sys.executable, WORKER, "kill", str(tmp_path)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    for line in proc.stdout:
      if line.startswith("SAVING"):
        proc.send_signal(signal.SIGKILL)
        break
  finally:
    proc.kill()
    _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
  leftovers = sorted(os.listdir(tmp_path))
  # The kill landed inside the write of step 2: only its temporary directory exists.
  assert "2" not in leftovers and any(n.startswith("2.orbax-checkpoint-tmp") for n in leftovers), \
      leftovers

  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == 1
    restored = ckpt.restore()
    step1 = checkpoint_worker.tree_for_step(1, *checkpoint_worker.SMALL)
    _assert_trees_equal(restored.items["unet"], step1)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                  jax.random.key_data(jax.random.key(1)))
    assert restored.config == {"step": 1}
    # The resumed run saves step 2 again; the half-written one is gone.
    ckpt.save(2, {"unet": _params(2)})
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2]


def _full_disk_writer(self, item, directory):
  """Stands in for the JSON writer: writes a few bytes, then the disk is full."""
  async def write():
    path = directory / self._filename
    path.write_text(json.dumps(item)[:4])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
  return write()


# Writer threads of the other items end on their own after the failure; their
# late complaints (event loop closed) are expected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_save", [True, False])
def test_no_space_left_keeps_previous_checkpoint(tmp_path, monkeypatch, async_save):
  ckpt = Checkpointer(tmp_path, async_save=async_save)
  ckpt.save(1, {"unet": _params(1)}, config={"a": 1})
  ckpt.wait()
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", _full_disk_writer)
  with pytest.raises(CheckpointSaveError) as info:
    ckpt.save(2, {"unet": _params(2)}, config={"a": 2})
    ckpt.wait()  # an asynchronous save reports here
  message = str(info.value)
  assert message.startswith("checkpoint save failed: no space left on device")
  assert "step 2" in message and "previous checkpoint at step 1 is intact" in message
  assert sorted(os.listdir(tmp_path)) == ["1"]  # partial files of step 2 removed
  monkeypatch.undo()

  assert ckpt.latest_step() == 1
  _assert_trees_equal(ckpt.restore().items["unet"], _params(1))
  assert ckpt.save(3, {"unet": _params(3)})  # space is back: saving works again
  ckpt.close()
  assert Checkpointer(tmp_path).all_steps() == [1, 3]


def _can_mount_tmpfs():
  if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
    return False
  probe = tempfile.mkdtemp()
  try:
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                      capture_output=True).returncode:
      return False
    subprocess.run(["umount", probe], check=True)
    return True
  finally:
    os.rmdir(probe)


# A real full file system (a 1 MiB tmpfs) needs root on Linux; elsewhere the simulated writer
# above covers the path.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_space_left_on_a_real_full_disk(tmp_path):
  if not _can_mount_tmpfs():  # probed when the test runs, not at collection
    pytest.skip("mounting a 1 MiB tmpfs needs root on Linux")
  disk = tmp_path / "disk"
  disk.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
  try:
    ckpt = Checkpointer(disk / CHECKPOINT_SUBDIR)
    ckpt.save(1, {"unet": _params(1)})
    ckpt.wait()
    rng = np.random.default_rng(0)  # random values do not compress: 2 MiB > 1 MiB
    big = {f"w{i}": rng.normal(size=(256, 256)).astype(np.float32) for i in range(8)}
    with pytest.raises(CheckpointSaveError,
                       match=r"no space left on device .*previous checkpoint at step 1 is intact"):
      ckpt.save(2, {"unet": big})
      ckpt.wait()
    assert sorted(os.listdir(disk / CHECKPOINT_SUBDIR)) == ["1"]
    _assert_trees_equal(ckpt.restore().items["unet"], _params(1))
    ckpt.close()
  finally:
    subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------- mismatches


def test_architecture_mismatch_names_keys_and_shapes(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"unet": _params()})
    wider = {"conv_in": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32),
                         "bias": jax.ShapeDtypeStruct((8,), jnp.float32)},
             "extra": {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.float32)}}
    with pytest.raises(CheckpointMismatchError) as info:
      ckpt.restore(abstract_items={"unet": wider})
    message = str(info.value)
    assert "unet/conv_in/kernel: checkpoint shape (3, 3, 4, 8) != expected shape (3, 3, 4, 16)" \
        in message
    assert "unet/extra/kernel: missing from the checkpoint (expected shape (2, 2))" in message
    assert "unet/out/kernel: in the checkpoint (shape (8, 2)) but not expected" in message
    assert "conv_in/bias" not in message  # matching entries are not listed
    with pytest.raises(CheckpointMismatchError, match=r"no item\(s\) \['vae'\].*\['unet'\]"):
      ckpt.restore(abstract_items={"vae": _abstract(_params())})
    with pytest.raises(CheckpointMismatchError, match="no data iterator state"):
      ckpt.restore(data_iterator=iter(_dataset()))


# ---------------------------------------------------------------- sharded restore


def test_sharded_restore_lands_on_requested_shardings(sharded_run):
  proc, out = sharded_run
  log, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, log[-4000:]
  result = json.loads(out.read_text())
  saved, same, fsdp8 = result["saved"], result["same"], result["fsdp8"]
  assert saved["Dense_0/kernel"] == {"spec": "P('fsdp', None)", "shard_shapes": [[8, 64]],
                                     "devices": 8}
  assert same == saved and result["same_equal"]
  # Restored onto a different mesh (fsdp=8): the same values, split 8 ways.
  assert fsdp8["Dense_0/kernel"]["shard_shapes"] == [[32 // 8, 64]]
  assert fsdp8["Conv_1/kernel"]["shard_shapes"] == [[3, 3, 16 // 8, 32]]
  assert fsdp8["Conv_0/kernel"]["shard_shapes"] == [[3, 3, 3, 16]]  # 3 channels: replicated
  assert result["fsdp8_equal"]
  # Without a target every array is replicated on all 8 devices.
  assert all(leaf["spec"] == "P()" and leaf["devices"] == 8
             for leaf in result["replicated"].values())
  assert result["replicated"]["Dense_0/kernel"]["shard_shapes"] == [[32, 64]]
  assert result["replicated_equal"]
