"""Tests of diffusion_jax.parallel: mesh, logical rules, sharded training, multi-process.

Multi-device runs happen in subprocesses (tests/parallel_worker.py), because JAX reads
the forced CPU device count (XLA_FLAGS) once, when it is imported. The three worker
processes (one with 8 devices, two joined by jax.distributed) start together, when
the first test needs them.
"""

import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from diffusion_jax import parallel

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
TIMEOUT_S = 240


def _env(device_count):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Runs:
  """Worker subprocesses started together; results read on first use."""

  def __init__(self, tmp_path):
    self.procs = {}
    port = _free_port()
    self._start("mesh", ["mesh"], 8, tmp_path)
    for i in range(2):
      self._start(f"host{i}", ["multihost", "--process-id", str(i), "--num-processes", "2",
                               "--port", str(port)], 2, tmp_path)

  def _start(self, name, args, devices, tmp_path):
    out = tmp_path / f"{name}.json"
    proc = subprocess.Popen([sys.executable, WORKER, *args, "--out", str(out)], env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.procs[name] = (proc, out)

  def result(self, name):
    proc, out = self.procs[name]
    try:
      log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.close()
      log, _ = proc.communicate()
      pytest.fail(f"worker {name} timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, f"worker {name} failed:\n{log[-4000:]}"
    return json.loads(out.read_text())

  def close(self):
    for proc, _ in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  runs = _Runs(tmp_path_factory.mktemp("parallel"))
  yield runs
  runs.close()


# ----------------------------------------------------------------- in-process tests


@pytest.mark.parametrize("shape, devices, expected", [
    ({"data": -1, "fsdp": 1}, 8, (8, 1)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4)),
    ({"fsdp": 4}, 4, (1, 4)),
    ({"data": -1}, 1, (1, 1)),
])
def test_resolve_mesh_shape(shape, devices, expected):
  assert parallel._resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, devices, message", [
    ({"data": 3, "fsdp": -1}, 8, "do not divide"),
    ({"data": 2, "fsdp": 2}, 8, "needs 4 devices but 8"),
    ({"data": -1, "fsdp": -1}, 8, "at most one"),
    ({"model": 2}, 8, "unknown mesh axes"),
])
def test_resolve_mesh_shape_errors(shape, devices, message):
  with pytest.raises(ValueError, match=message):
    parallel._resolve_mesh_shape(shape, devices)


def test_make_mesh_uses_every_device():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1})
  assert mesh.axis_names == parallel.MESH_AXES
  assert mesh.devices.size == jax.device_count()
  with pytest.raises(ValueError, match="needs"):
    parallel.make_mesh({"data": jax.device_count() + 1})


class _Named(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, 8, 8, 3]
    conv = nn.Conv(12, (3, 3), name="conv_in", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_h", "conv_w", "embed", "mlp")))
    x = conv(x).mean(axis=(1, 2))  # [B, 12]
    table = self.param("table", nn.with_logical_partitioning(
        nn.initializers.normal(), ("vocab", "embed")), (7, 12))
    plain = self.param("plain", nn.initializers.zeros, (8, 8))
    return nn.Dense(8, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")))(x) + table.sum() + plain.sum()


def _abstract_named():
  return jax.eval_shape(_Named().init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))


def test_param_shardings_follow_rules_and_fall_back():
  mesh = AbstractMesh((2, 4), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  shardings = parallel.param_shardings(_abstract_named(), mesh)["params"]
  # in-dim 3 of conv_in is not divisible by fsdp=4: replicated instead of padded
  assert shardings["conv_in"]["kernel"].spec == P(None, None, None, None)
  assert shardings["conv_in"]["bias"].spec == P(None)
  assert shardings["Dense_0"]["kernel"].spec == P("fsdp", None)
  assert shardings["Dense_0"]["kernel"].shard_shape((12, 8)) == (3, 8)
  assert shardings["table"].spec == P(None, "fsdp")
  assert all(a is None for a in shardings["plain"].spec)  # no logical names: replicated


def test_param_shardings_rules_can_be_overridden():
  mesh = AbstractMesh((2, 4), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  # tensor-parallel style, written as a config or JSON file would hold it (lists)
  rules = [["batch", ["data", "fsdp"]], ["mlp", "fsdp"], ["embed", None]]
  shardings = parallel.param_shardings(_abstract_named(), mesh, rules)["params"]
  assert shardings["Dense_0"]["kernel"].spec == P(None, "fsdp")
  assert shardings["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")  # 12 out: divisible
  assert shardings["table"].spec == P(None, None)
  assert parallel.batch_sharding(parallel.make_mesh({"data": -1}), rules).spec == \
      P(("data", "fsdp"))


def test_init_sharded_unboxes_and_matches_plain_init():
  mesh = parallel.make_mesh({"data": -1})
  x = np.ones((1, 8, 8, 3), np.float32)
  params, shardings = parallel.init_sharded(_Named().init, mesh, parallel.LOGICAL_AXIS_RULES,
                                            jax.random.key(1), x)
  reference = nn.meta.unbox(jax.jit(_Named().init)(jax.random.key(1), x))
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  for got, want, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(reference),
                                 jax.tree.leaves(shardings)):
    assert isinstance(got, jax.Array) and got.sharding == sharding
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-8)
  assert "Dense_0/kernel: (12, 8) float32" in parallel.describe(params)


def test_make_global_batch_checks_divisibility():
  mesh = parallel.make_mesh({"data": -1})
  batch = parallel.make_global_batch({"x": np.arange(6 * jax.device_count()).reshape(-1, 2)}, mesh)
  np.testing.assert_array_equal(np.asarray(batch["x"]),
                                np.arange(6 * jax.device_count()).reshape(-1, 2))
  if jax.device_count() > 1:
    with pytest.raises(ValueError, match="not divisible"):
      parallel.make_global_batch({"x": np.zeros((jax.device_count() + 1, 2))}, mesh)


def test_initialize_distributed_is_a_no_op_on_one_machine(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
               "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  assert not jax.distributed.is_initialized()
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not parallel._launched_multi_process()  # one task: nothing to join
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel._launched_multi_process()
  monkeypatch.delenv("SLURM_JOB_ID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
  assert parallel._launched_multi_process()


# ------------------------------------------------------- 8 devices: data=2 x fsdp=4


@pytest.mark.slow
def test_mesh_parameters_are_sharded(runs):
  result = runs.result("mesh")
  assert result["mesh_shape"] == {"data": 2, "fsdp": 4}
  leaves = result["leaves"]
  fsdp = 4
  for name in ("conv_mid/kernel", "fc1/kernel", "fc2/kernel", "token_embedding",
               "position_embedding"):
    leaf = leaves[name]
    dim = leaf["spec"].index("fsdp")  # the "embed" dimension
    expected = list(leaf["shape"])
    expected[dim] //= fsdp
    assert leaf["shard_shapes"] == [expected], name
    assert leaf["num_shards"] == 8 and leaf["matches_plan"], name
  assert leaves["conv_mid/kernel"]["spec"] == [None, None, "fsdp", None]
  assert leaves["fc1/kernel"]["spec"] == ["fsdp", None]
  # Non-divisible "embed" (3 RGB channels over fsdp=4) falls back to replicated.
  assert leaves["conv_in/kernel"]["spec"] == [None, None, None, None]
  assert leaves["conv_in/kernel"]["shard_shapes"] == [[3, 3, 3, 16]]
  for name in ("conv_in/bias", "fc1/bias", "norm/scale", "norm/bias", "logit_scale", "offset"):
    assert leaves[name]["shard_shapes"] == [leaves[name]["shape"]], name  # replicated
  # Adam moments follow their parameters, the step count is replicated.
  assert result["mu_conv_mid_spec"] == "P(None, None, 'fsdp', None)"
  assert result["count_spec"] == "P()"
  assert "fc1/kernel: (48, 64) float32 P('fsdp', None) shard=(12, 64)" in result["describe"]


def test_mesh_batch_is_split_over_data_and_fsdp(runs):
  result = runs.result("mesh")
  assert result["batch_spec"] == "P(('data', 'fsdp'),)"
  assert result["batch_shard_shapes"] == [[16 // 8, 8, 8, 3]]
  assert "not divisible by the 8 batch shards" in result["errors"]["batch"]
  assert "do not divide the 8 devices" in result["errors"]["mesh"]


def test_mesh_training_matches_one_device(runs):
  result = runs.result("mesh")
  assert len(result["losses"]) == 3
  np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5)
  assert len(set(result["losses"])) == 3  # the parameters really changed between steps


# ------------------------------------------------- 2 processes x 2 devices over gloo


def test_two_processes_train_like_one(runs):
  hosts = [runs.result(f"host{i}") for i in range(2)]
  reference = runs.result("mesh")["reference_losses"]  # one process, one device
  for i, host in enumerate(hosts):
    assert host["started"] and host["again"]  # a second initialize_distributed is a no-op
    assert host["process_index"] == i and host["process_count"] == 2
    assert host["local_devices"] == 2 and host["devices"] == 4
    assert host["mesh_shape"] == {"data": 2, "fsdp": 2}
    assert host["fc1_spec"] == "P('fsdp', None)"
    assert host["fc1_local_shard_shapes"] == [[48 // 2, 64]]
    np.testing.assert_allclose(host["losses"], reference, rtol=1e-5)
