"""The training loop shared by the stages: state initialisation or restore, the compiled step, the loop.

A run trains `config.stages` in order into one work directory:

  <workdir>/checkpoints/<step>/   one Checkpointer for the whole run; steps are numbered across stages
                                  (stage i owns steps offset_i + 1 ... offset_i + steps_i)
  <workdir>/metrics.jsonl         one JSON object per logged step or evaluation
  <workdir>/tensorboard/          the same scalars for TensorBoard
  <workdir>/samples/              PNG grids (reconstructions, generated images)
  <workdir>/stages/<name>.json    written when a stage has finished: its final metrics and timings
  <workdir>/model/                the exported diffusers-format model (diffusion stage)

Each checkpoint holds the trained stage's items (`<component>`, `<component>_opt_state`,
`<component>_ema`, `<component>_counters`), the outputs of the stages before it ("vae", "clip"),
the step's PRNG key, the config and the grain iterator state, so a restart continues with
exactly the batches and random draws an uninterrupted run would have used.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from diffusion_jax import parallel, xla_options
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.train import data as data_lib
from diffusion_jax.train import optim
from diffusion_jax.train import state as state_lib
from diffusion_jax.train import step as step_lib


_START = time.perf_counter()


def log(message: str) -> None:
  """A progress line on stderr (process 0), stamped with the seconds since the run started."""
  if jax.process_index() == 0:
    tqdm.write(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr)


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class RunMismatchError(ValueError):
  """The work directory holds a run whose stages or step counts differ from the config's."""


@dataclasses.dataclass
class Stage:
  """What a stage builder hands the loop."""
  cfg: Any  # the stage's config block (steps, batch_size, learning_rate ...)
  init_fn: Callable[[jax.Array], Any]  # rng -> params boxed with logical axis names
  loss_fn: step_lib.LossFn
  batch_fields: tuple[str, ...]  # host batch fields fed to the step
  make_iterator: Callable[[], Any]  # -> a grain iterator of host batches
  frozen: Any = None  # untrained arrays the loss reads (already placed on the mesh)
  initial_params: Any = None  # host arrays replacing init_fn's parameters (fine-tuning)
  # (state, step, final) -> metrics; draws and logs whatever the stage evaluates.
  evaluate: Callable[[state_lib.TrainState, int, bool], dict] | None = None
  on_checkpoint: Callable[[state_lib.TrainState, int], None] | None = None  # e.g. export, after each save
  on_finish: Callable[[state_lib.TrainState], None] | None = None  # after the final evaluation
  name: str = ""  # the stage's name in stages.REGISTRY (set by stages.build)
  component: str = ""  # checkpoint item of the trained network (set by stages.build from the registry)


# ------------------------------------------------------------------------------------------ logging


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 [rows * H, columns * W, 3] image (missing cells white)."""
  n, h, w, c = images.shape
  columns = min(columns, n)
  rows = math.ceil(n / columns)
  grid = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


class MetricWriter:
  """metrics.jsonl + TensorBoard scalars + PNG grids, written by process 0 only."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, stage: str, step: int, metrics: dict, kind: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"stage": stage, "kind": kind, "step": step, **clean}) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(f"{stage}/{kind}/{k}", v, step)
    self._tb.flush()

  def image(self, name: str, step: int, grid: np.ndarray) -> str | None:
    """Saves a uint8 [H, W, 3] grid as samples/<name>_<step>.png (and in TensorBoard)."""
    if not self.enabled:
      return None
    from PIL import Image  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
    path = os.path.join(self.workdir, "samples", f"{name}_{step:07d}.png")
    Image.fromarray(grid).save(path)
    self._tb.add_image(name, grid, step, dataformats="HWC")
    return path

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


# ------------------------------------------------------------------------------------------ the run


def stage_bounds(config: Any) -> dict[str, tuple[int, int]]:
  """{stage: (offset, end)}: the global steps (offset, end] each stage owns."""
  bounds, offset = {}, 0
  for name in config.stages:
    steps = int(config[name].steps)
    bounds[name] = (offset, offset + steps)
    offset += steps
  return bounds


@dataclasses.dataclass
class Run:
  """The state shared by the stages of one run directory."""
  config: Any
  workdir: str
  mesh: Any
  checkpointer: Checkpointer
  writer: MetricWriter
  bounds: dict[str, tuple[int, int]]
  latest: int | None  # newest complete checkpoint step when the run started (or None)

  @classmethod
  def open(cls, config: Any, workdir: str, mesh) -> "Run":
    """Opens (or creates) the run directory; raises RunMismatchError for a different run's directory."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer.for_workdir(workdir, max_to_keep=int(config.keep_checkpoints))
    bounds = stage_bounds(config)
    latest = ckpt.latest_step()
    if latest is not None:
      saved = ckpt.restore(latest, abstract_items={}).config or {}
      saved_bounds = stage_bounds_from_dict(saved)
      if saved_bounds != bounds:
        ckpt.close()
        raise RunMismatchError(
            f"{workdir} holds a run with stages {saved_bounds} (offset, end), but the config asks for {bounds}: "
            "use another --workdir, or the config that started this run")
    return cls(config, workdir, mesh, ckpt, MetricWriter(workdir), bounds, latest)

  def marker(self, stage: str) -> str:
    return os.path.join(self.workdir, "stages", f"{stage}.json")

  def finished(self, stage: str) -> bool:
    """Whether `stage` has run to its end, been evaluated and exported."""
    _, end = self.bounds[stage]
    latest = self.checkpointer.latest_step()
    if latest is None or latest < end:
      return False
    return latest > end or os.path.exists(self.marker(stage))

  def carried(self, names: tuple[str, ...]) -> dict:
    """Outputs of earlier stages (e.g. "vae", "clip") read from the newest checkpoint, replicated."""
    if not names:
      return {}
    latest = self.checkpointer.latest_step()
    if latest is None:
      raise FileNotFoundError(f"no checkpoint in {self.workdir} holds {names}: run the earlier stages first")
    return self.checkpointer.restore(latest, abstract_items=dict.fromkeys(names)).items

  def write_marker(self, stage: str, record: dict) -> None:
    if jax.process_index() != 0:
      return
    path = self.marker(stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
    results = {}
    for name in self.config.stages:
      if os.path.exists(self.marker(name)):
        with open(self.marker(name)) as f:
          results[name] = json.load(f)
    with open(os.path.join(self.workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, default=float)

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()


def stage_bounds_from_dict(saved: dict) -> dict[str, tuple[int, int]]:
  bounds, offset = {}, 0
  for name in saved.get("stages", ()):
    steps = int(saved.get(name, {}).get("steps", 0))
    bounds[name] = (offset, offset + steps)
    offset += steps
  return bounds


# ------------------------------------------------------------------------------------------ state


@dataclasses.dataclass
class Compiled:
  """The shardings and the compiled step of a stage."""
  tx: Any
  state_shardings: state_lib.TrainState
  step_fn: Callable
  rng: jax.Array  # the stage's training key (restored from the checkpoint when resuming)
  start: int  # the stage's first step to run


def _use_ema(cfg: Any) -> bool:
  return float(cfg.get("ema_decay", 0.0)) > 0


def _items(component: str, state: state_lib.TrainState) -> dict:
  items = {component: state.params, f"{component}_opt_state": state.opt_state,
           f"{component}_counters": state.counters()}
  if state.ema_params is not None:
    items[f"{component}_ema"] = state.ema_params
  return items


def init_or_restore(run: Run, stage: Stage, index: int, iterator) -> tuple[state_lib.TrainState, Compiled]:
  """Shape-first initialisation (or restore) of the stage's state on the mesh.

  jax.eval_shape(init) -> param_shardings -> jax.jit(init, out_shardings); when the newest
  checkpoint lies inside this stage, the state, PRNG key and data iterator are restored instead.
  """
  cfg, mesh = stage.cfg, run.mesh
  tx = optim.make_optimizer(cfg)
  rng = jax.random.fold_in(jax.random.key(int(run.config.seed)), index)
  init_rng, train_rng = jax.random.split(rng)
  with parallel.sharding_context(mesh):
    boxed = jax.eval_shape(stage.init_fn, init_rng)
  params_shardings = parallel.param_shardings(boxed, mesh)
  abstract_params = parallel.strip_boxes(boxed)
  replicated = parallel.replicated(mesh)
  use_ema = _use_ema(cfg)
  shardings = state_lib.TrainState(
      step=replicated, params=params_shardings,
      opt_state=parallel.optimizer_shardings(tx, abstract_params, params_shardings, mesh),
      ema_params=params_shardings if use_ema else None, nonfinite=replicated, nonfinite_total=replicated,
      frozen=jax.tree.map(lambda x: x.sharding, stage.frozen))

  def create(params, frozen):
    return state_lib.create(params, tx, use_ema=use_ema, frozen=frozen)

  offset, end = run.bounds[stage.name]
  latest = run.checkpointer.latest_step()
  if latest is not None and offset < latest <= end:
    abstract = parallel.with_shardings(jax.eval_shape(create, abstract_params, stage.frozen), shardings)
    restored = run.checkpointer.restore(latest, abstract_items=_items(stage.component, abstract),
                                        data_iterator=iterator)
    items = restored.items
    state = abstract.replace(
        params=items[stage.component], opt_state=items[f"{stage.component}_opt_state"],
        ema_params=items.get(f"{stage.component}_ema"), frozen=stage.frozen,
    ).with_counters(items[f"{stage.component}_counters"])
    state = jax.device_put(state, shardings)
    # The key comes back on a mesh of its own; the step function wants it on this run's mesh.
    train_rng = jax.device_put(restored.rng, replicated)
    start = int(jax.device_get(state.step))
  else:
    if stage.initial_params is not None:
      params = jax.device_put(stage.initial_params, params_shardings)
    else:
      params, _ = parallel.init_sharded(stage.init_fn, mesh, parallel.LOGICAL_AXIS_RULES, init_rng)
    state = jax.jit(create, out_shardings=shardings)(params, stage.frozen)
    start = 0

  if jax.process_index() == 0:  # where every parameter lives, for checking a mesh layout
    os.makedirs(os.path.join(run.workdir, "stages"), exist_ok=True)
    with open(os.path.join(run.workdir, "stages", f"{stage.name}_shardings.txt"), "w") as f:
      f.write(parallel.describe({"params": state.params, "opt_state": state.opt_state}) + "\n")

  nan_window = None
  debug = run.config.debug
  if debug.nan_stage == stage.name and int(debug.nan_steps) > 0:
    nan_window = (int(debug.nan_from_step), int(debug.nan_steps))
  train_step = step_lib.make_train_step(stage.loss_fn, tx, microbatches=int(cfg.microbatches),
                                        ema_decay=float(cfg.get("ema_decay", 0.0)), nan_window=nan_window)
  with parallel.sharding_context(mesh):
    step_fn = jax.jit(train_step, in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
                      out_shardings=(shardings, replicated), donate_argnums=0,
                      compiler_options=xla_options.compiler_options(cfg.xla_scheduler))
  return state, Compiled(tx, shardings, step_fn, train_rng, start)


# ------------------------------------------------------------------------------------------ loop


def save(run: Run, stage: Stage, state: state_lib.TrainState, step: int, rng, iterator, carried: dict) -> None:
  offset, _ = run.bounds[stage.name]
  run.checkpointer.save(offset + step, {**carried, **_items(stage.component, state)}, rng=rng,
                        data_iterator=iterator, config=run.config, force=True)


def _short(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _mean(window: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


def train(run: Run, stage: Stage, state: state_lib.TrainState, compiled: Compiled, iterator,
          carried: dict) -> state_lib.TrainState:
  """Runs the stage's steps from `compiled.start` with logging, evaluations and checkpoints."""
  cfg, mesh = stage.cfg, run.mesh
  steps = int(cfg.steps)
  offset, _ = run.bounds[stage.name]
  max_nonfinite = int(run.config.max_consecutive_nonfinite)
  log_every, eval_every = int(cfg.log_every), int(cfg.eval_every)
  ckpt_every = int(cfg.checkpoint_every)
  schedule = optim.learning_rate_schedule(cfg)
  window: list[dict] = []
  timer, timed_steps = None, 0
  bar = tqdm(total=steps, initial=compiled.start, desc=stage.name, unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  for step in range(compiled.start, steps):
    batch = data_lib.global_batch(next(iterator), stage.batch_fields, mesh)
    with parallel.sharding_context(mesh):
      state, metrics = compiled.step_fn(state, batch, compiled.rng)
    metrics = jax.device_get(metrics)
    done = step + 1
    if timer is None:
      timer = time.perf_counter()  # the first step includes compilation: time the rest
      log(f"{stage.name}: step {done} done (compiled) ")
    else:
      timed_steps += 1
    window.append(metrics)
    stop = int(metrics["nonfinite_consecutive"]) >= max_nonfinite
    if done % log_every == 0 or done == steps or stop:
      logged = _mean(window)
      logged.update(learning_rate=float(schedule(done - 1)), skipped=float(np.sum([m["skipped"] for m in window])),
                    nonfinite_total=float(metrics["nonfinite_total"]))
      if timed_steps:
        logged["steps_per_second"] = timed_steps / (time.perf_counter() - timer)
      run.writer.scalars(stage.name, offset + done, logged)
      bar.set_postfix(loss=f"{logged['loss']:.4g}")
      window = []
    if stop:
      bar.close()
      run.checkpointer.wait()
      kept = run.checkpointer.latest_step()
      where = f"the checkpoint at step {kept} is kept" if kept is not None else "no checkpoint was written"
      raise NonFiniteError(
          f"stage {stage.name}: loss or gradients not finite for {max_nonfinite} consecutive steps "
          f"(stage steps {done - max_nonfinite + 1}-{done}); stopping, {where} (parameters from before the fault)")
    if stage.evaluate is not None and eval_every > 0 and done % eval_every == 0 and done != steps:
      t_eval = time.perf_counter()
      evaluated = stage.evaluate(state, offset + done, False)
      log(f"{stage.name}: evaluation at step {done} took {time.perf_counter() - t_eval:.1f}s: "
          + _short(evaluated))
      run.writer.scalars(stage.name, offset + done, evaluated, kind="eval")
    healthy = int(metrics["nonfinite_consecutive"]) == 0
    if done == steps or (ckpt_every > 0 and done % ckpt_every == 0 and healthy):
      t_save = time.perf_counter()
      save(run, stage, state, done, compiled.rng, iterator, carried)
      if stage.on_checkpoint is not None:
        stage.on_checkpoint(state, offset + done)
      log(f"{stage.name}: checkpoint at step {done} ({time.perf_counter() - t_save:.1f}s)")
    bar.update(1)
  bar.close()
  if timed_steps:
    log(f"{stage.name}: {timed_steps / (time.perf_counter() - timer):.2f} steps/s after the first step")
  return state


def finish(run: Run, stage: Stage, state: state_lib.TrainState, seconds: float) -> dict:
  """Final evaluation, the stage's closing actions (export), and the stage's marker file."""
  offset, end = run.bounds[stage.name]
  run.checkpointer.wait()
  t0 = time.perf_counter()
  metrics = {}
  if stage.evaluate is not None:
    metrics = stage.evaluate(state, end, True)
    run.writer.scalars(stage.name, end, metrics, kind="final")
    log(f"{stage.name}: final evaluation took {time.perf_counter() - t0:.1f}s: {_short(metrics)}")
  if stage.on_finish is not None:
    stage.on_finish(state)
  record = {"steps": int(stage.cfg.steps), "global_steps": [offset, end], "final": metrics,
            "train_seconds": seconds, "eval_seconds": time.perf_counter() - t0}
  run.write_marker(stage.name, record)
  return record
