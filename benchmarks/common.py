"""Helpers shared by the benchmark scripts: timing, peak memory, XLA cost analysis, subprocess workers.

Every measurement runs in its own subprocess so that its peak resident memory (VmHWM) is its own and one
configuration's compiled programs and buffers never slow down the next.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "BENCH_RESULT "  # the line a worker prints its JSON result on


def median_ms(fn, repeats: int = 5, warmup: bool = True) -> float:
  """One warm-up call, then the median of `repeats` timed calls, in milliseconds (as the peers' script)."""
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2] * 1e3


def alternate(programs: dict, args: tuple, repeats: int) -> dict:
  """Median ms of each compiled program, calls alternating between them after one warm-up each."""
  import jax
  import numpy as np
  times = {name: [] for name in programs}
  for program in programs.values():
    jax.block_until_ready(program(*args))
  for _ in range(repeats):
    for name, program in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(program(*args))
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: float(np.median(t)) for name, t in times.items()}


def start_on_cpu(parser, what: str):
  """Re-executes with huge pages as `train.py --huge-pages` does, then stops with `parser`'s usage unless JAX
  runs on the CPU (`what` the benchmark compares there). Returns the jax module."""
  from diffusion_jax import host_memory
  host_memory.reexec_with_huge_pages()
  import jax
  if jax.default_backend() != "cpu":
    parser.error(f"this benchmark compares {what}; run it with JAX on the CPU")
  return jax


def _proc_gb(path: str, field: str, missing: float) -> float:
  """A "<field>: <n> kB" line of a /proc file, in GB (1e9 bytes); `missing` when it is absent."""
  with open(path) as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024 / 1e9
  return missing


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far (VmHWM), in GB."""
  return _proc_gb("/proc/self/status", "VmHWM", float("nan"))


def flops_of(program) -> float | None:
  """XLA's FLOP count of a lowered or compiled program (cost_analysis), or None if the backend gives none."""
  try:
    cost = program.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost["flops"]) if cost and "flops" in cost else None


def available_memory_gb() -> float:
  """MemAvailable of /proc/meminfo, in GB."""
  return _proc_gb("/proc/meminfo", "MemAvailable", float("inf"))


def wait_for_memory(needed_gb: float, timeout_s: float = 900, poll_s: float = 15) -> str | None:
  """Waits until `needed_gb` is available (others share this machine); returns why not, or None."""
  deadline = time.time() + timeout_s
  while (free := available_memory_gb()) < needed_gb:
    if time.time() > deadline:
      return f"only {free:.1f} GB of memory available, {needed_gb} GB needed"
    time.sleep(poll_s)
  return None


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def emit(result: dict) -> None:
  """Prints a worker's result on one tagged line (the parent ignores every other line)."""
  print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(argv: list[str], *, env: dict | None = None, timeout: float = 3600) -> dict:
  """Runs a worker subprocess; returns its tagged JSON result, or {"error": ...} with the tail of its output."""
  start = time.perf_counter()
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  wall = time.perf_counter() - start
  results = [json.loads(line[len(RESULT_TAG):]) for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
  if proc.returncode != 0 or not results:
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
    return {"error": why, "output_tail": tail, "wall_s": round(wall, 1), **(results[-1] if results else {})}
  return {**results[-1], "wall_s": round(wall, 1)}


def write_json(result: dict, path: str | None) -> None:
  """Prints the result as JSON on stdout and writes it to `path` (directories created)."""
  text = json.dumps(result, indent=2)
  print(text)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text + "\n")
