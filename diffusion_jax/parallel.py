"""Device mesh, logical axis rules, shardings and multi-process start-up.

Parameters carry logical axis names (``nn.with_logical_partitioning``); one table,
``LOGICAL_AXIS_RULES``, maps them onto the two mesh axes:

  data  pure data parallelism: the batch is split, parameters are replicated.
  fsdp  fully sharded data parallelism: the batch is split AND every parameter is
        split along its input dimension ("embed"), gathered just in time by XLA.

Shape-first initialisation: ``jax.eval_shape(init)`` gives the parameter shapes and
names without allocating them, ``param_shardings`` turns those into ``NamedSharding``s,
and ``jax.jit(init, out_shardings=...)`` materialises every parameter directly on its
shards. Parameters are returned unboxed (plain arrays) next to a separate tree of
shardings: plain arrays are what optax, orbax and the weight converters expect.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
# Parameters are split only along "embed" (the input dimension of dense and conv
# kernels), which is FSDP; the batch is split over every mesh axis.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", None),
    ("conv_h", None),
    ("conv_w", None),
    ("vocab", None),
    ("pos", None),
    ("norm", None),
    ("heads", None),
    ("kv", None),
)

Rules = Sequence[tuple[str, Any]]


def normalize_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Rules as flax expects them: tuples all the way (configs and JSON give lists)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in rules)


# ----------------------------------------------------------------------------- mesh


def _resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Turns {"data": -1, "fsdp": 2} into concrete sizes (in MESH_AXES order)."""
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes (product {known}) do not divide "
          f"the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices but {num_devices} are "
        "available; use -1 for one axis to take the rest")
  return tuple(sizes)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a ("data", "fsdp") mesh over `devices` (default: every device of every process).

  Args:
    mesh_shape: axis name -> size; one size may be -1 to take the remaining devices,
      a missing axis has size 1. Example: {"data": -1, "fsdp": 4}.
    devices: the devices to use; default `jax.devices()`.

  Raises:
    ValueError: the sizes do not multiply to (or divide) the device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = _resolve_mesh_shape(dict(mesh_shape), len(devices))
  # jax.make_mesh orders devices by the physical topology (TPU/GPU slices, hosts),
  # which keeps the fsdp axis (the most communication) inside fast links.
  # Auto axes: shardings propagate through jit (GSPMD) and logical constraints apply.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
  """Makes `mesh` and `rules` current, so `nn.with_logical_constraint` takes effect.

  Trace (call or jit-compile) the model inside this context.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules)):
    yield


# ------------------------------------------------------------------------ shardings


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  return math.prod(mesh.shape[name] for name in names)


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops the sharding of every dimension that its mesh axes do not divide.

  XLA could pad such dimensions, but device_put, make_array_from_callback and
  orbax restores need even shards, and a dimension this small (3 RGB input
  channels of conv_in under fsdp=4, a 1-wide bias) costs nothing to replicate.
  """
  axes = list(spec) + [None] * (len(shape) - len(spec))
  kept = [a if dim % _axis_size(mesh, a) == 0 else None for a, dim in zip(axes, shape)]
  return PartitionSpec(*kept)


def logical_to_sharding(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                        rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
  """NamedSharding for one array with logical axis names (or an empty spec)."""
  mesh_spec = nn.logical_to_mesh(logical, normalize_rules(rules))
  return NamedSharding(mesh, _divisible_spec(mesh_spec, shape, mesh))


def strip_boxes(tree: Any) -> Any:
  """Replaces `nn.Partitioned` boxes by their values without applying sharding constraints.

  (`nn.meta.unbox` would constrain LogicallyPartitioned values to their sharding,
  which fails on the ShapeDtypeStructs of `jax.eval_shape` when a mesh is active.)
  """
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(abstract_variables: Any, mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """NamedSharding for every leaf of an (abstract) variable tree.

  Args:
    abstract_variables: output of `jax.eval_shape(model.init, ...)` (or real
      variables): leaves are `nn.Partitioned` boxes carrying logical names, or plain
      arrays / ShapeDtypeStructs, which are replicated.
    mesh: the device mesh.
    rules: logical name -> mesh axis table.

  Returns:
    A tree shaped like `nn.meta.unbox(abstract_variables)` with NamedSharding leaves.
  """
  logical_specs = nn.get_partition_spec(abstract_variables)  # PartitionSpec() for unnamed
  shapes = strip_boxes(abstract_variables)
  return jax.tree.map(
      lambda spec, x: logical_to_sharding(spec, np.shape(x), mesh, rules),
      logical_specs, shapes, is_leaf=_is_spec)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the restore target of a sharded checkpoint."""
  return jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
      strip_boxes(abstract_tree), shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES,
                 *args: Any) -> tuple[Any, Any]:
  """Initialises variables directly on their shards; nothing is materialised whole.

  Args:
    init_fn: e.g. `lambda rng, x: model.init(rng, x)`; may return `nn.Partitioned`
      boxes (with_logical_partitioning) or plain arrays.
    mesh: the device mesh.
    rules: logical name -> mesh axis table.
    *args: arguments of `init_fn` (arrays: rng keys, example inputs).

  Returns:
    (variables, shardings): unboxed variables (plain jax.Arrays) placed on their
    shardings, and the matching tree of NamedShardings (use it as in/out_shardings).
  """
  with sharding_context(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)
    init_unboxed = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)
    variables = init_unboxed(*args)
  return variables, shardings


def optimizer_shardings(tx: Any, abstract_params: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
  """Shardings of an optax state: moments follow their parameters, the rest is replicated.

  Args:
    tx: the optax GradientTransformation.
    abstract_params: unboxed params (arrays or ShapeDtypeStructs).
    params_shardings: NamedSharding tree matching `abstract_params`.
    mesh: the device mesh (used for the replicated leaves: step counts, scalars).
  """
  import optax  # local: parallel.py is also used where optax is not needed

  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state, params_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))


# -------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a batch: leading dimension split as the "batch" rule says."""
  return NamedSharding(mesh, nn.logical_to_mesh(PartitionSpec("batch"), normalize_rules(rules)))


def make_global_batch(local_batch: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """Assembles one global jax.Array per leaf from every process's local numpy batch.

  Each process passes its own `local_batch` (leading dimension = global batch /
  process count, the same on every process); the result is a global array whose
  leading dimension is split over the mesh's batch axes.

  Raises:
    ValueError: the global batch size is not divisible by the number of batch shards.
  """
  sharding = batch_sharding(mesh, rules)
  num_shards = _axis_size(mesh, sharding.spec[0] if len(sharding.spec) else None)
  num_processes = jax.process_count()

  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * num_processes,) + x.shape[1:]
    if global_shape[0] % num_shards:
      raise ValueError(
          f"global batch size {global_shape[0]} ({x.shape[0]} per process x {num_processes} "
          f"processes) is not divisible by the {num_shards} batch shards of mesh "
          f"{dict(mesh.shape)}")
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(to_global, local_batch)


# ----------------------------------------------------------------------- processes

# Environment variables whose presence means a launcher started several processes.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _launched_multi_process() -> bool:
  """True when the environment shows a multi-process launch that JAX can auto-detect."""
  env = os.environ
  if any(env.get(name) for name in _MULTI_PROCESS_ENV):
    return True
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # Multi-host Cloud TPU slice: one worker hostname per host.
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """Starts `jax.distributed` when asked or when a multi-process launch is detected.

  Call it before anything touches a device. With no arguments it does nothing on a
  single machine, and calls `jax.distributed.initialize()` (which finds its peers
  itself) on TPU pods, SLURM, Open MPI or when JAX_COORDINATOR_ADDRESS is set.
  Calling it again is a no-op.

  Returns:
    True when JAX runs as several processes.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  explicit = any(a is not None for a in (coordinator_address, num_processes, process_id))
  if not explicit and not _launched_multi_process():
    return False
  # CPU collectives between processes need gloo; harmless for GPU and TPU backends.
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return jax.process_count() > 1


# -------------------------------------------------------------------------- logging


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def describe(tree: Any) -> str:
  """One line per leaf: path, shape, dtype, partition spec and per-device shard shape."""
  lines = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape, dtype = tuple(np.shape(x)), getattr(x, "dtype", type(x).__name__)
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      where = "host"
    elif isinstance(sharding, NamedSharding):
      where = f"{sharding.spec} shard={sharding.shard_shape(shape)}"
    else:
      where = f"{type(sharding).__name__} shard={sharding.shard_shape(shape)}"
    lines.append(f"{_path_str(path) or '<root>'}: {shape} {dtype} {where}")
  return "\n".join(lines)
