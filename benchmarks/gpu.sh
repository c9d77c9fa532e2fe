#!/usr/bin/env bash
# SD 1.5 UNet on one NVIDIA GPU (H100 / H200), 512x512 images (64x64x4 latents), batch 1 and 8:
# ours (JAX/Flax, bf16 compute, fp32 parameters) and diffusers (PyTorch, fp16, SDPA) in the same run,
# forward and train step (forward + backward + AdamW) medians, written as one JSON file.
#
#   JAX_PYTHON=python3 TORCH_PYTHON=python3 PYTHONPATH=$PWD LOG_DIR=/tmp/gpu-logs \
#     bash benchmarks/gpu.sh [benchmarks/results/gpu.json]
#
# Installs nothing and needs no network. By the parts timed on an H100 it takes about 8 minutes:
# diffusers under 2 min for both batch sizes, ours ~3 min per batch size, most of it compilation
# (SD 1.5's bf16 train step took 95 s to compile, the forward 28 s). A part whose python is missing
# is skipped and the reason written to the JSON.
#
# JAX_PYTHON needs jax with its CUDA plugin (jax[cuda12] or jax[cuda13]), flax, optax and numpy, and this
# repository importable (`pip install --no-deps -e .` or PYTHONPATH); TORCH_PYTHON needs a CUDA build of
# torch and diffusers. One python can hold both.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu.json}
JAX_PYTHON=${JAX_PYTHON:-python3}
TORCH_PYTHON=${TORCH_PYTHON:-}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LOGS=${LOG_DIR:-$TMP}  # set LOG_DIR to keep each part's output
mkdir -p "$(dirname "$OUT")" "$LOGS"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$LOGS/gpu.txt" 2>&1 || true

# diffusers on PyTorch, fp16 with scaled_dot_product_attention, both batch sizes in one process.
if [ -n "$TORCH_PYTHON" ] && command -v "$TORCH_PYTHON" > /dev/null; then
  timeout 130 "$TORCH_PYTHON" benchmarks/gpu_peer_torch.py --batch 1,8 --repeats 10 > "$LOGS/torch.txt" 2>&1 \
    || echo "exit $?" >> "$LOGS/torch.txt"
else
  echo "TORCH_PYTHON=${TORCH_PYTHON:-unset} not found" > "$LOGS/torch.txt"
fi

# Ours: one process per batch size (its device peak memory is its own). remat "none": the card has room.
# Attention is cuDNN's fused kernel; if that program fails, the batch size runs again with XLA's.
ours() {  # batch, attention
  timeout 240 "$JAX_PYTHON" benchmarks/unet.py --worker ours --configs sd15 --batch "$1" --dtype bfloat16 \
    --remat none --repeats 10 --gpu-attention "$2" > "$LOGS/ours_$1_$2.txt" 2>&1 || echo "exit $?" >> "$LOGS/ours_$1_$2.txt"
  grep -q "^BENCH_RESULT " "$LOGS/ours_$1_$2.txt"
}
for batch in 1 8; do
  if ! command -v "$JAX_PYTHON" > /dev/null; then
    echo "JAX_PYTHON=$JAX_PYTHON not found" > "$LOGS/ours_${batch}_cudnn.txt"
  elif ! ours "$batch" cudnn; then
    ours "$batch" xla || true
  fi
done

# Collect: one JSON with each part's results (or the tail of its output) and the ratios ours / diffusers.
python3 - "$LOGS" "$OUT" <<'EOF'
import json, os, sys
tmp, out_path = sys.argv[1], sys.argv[2]

def results(name):
  path = os.path.join(tmp, name)
  if not os.path.exists(path):
    return [], []
  text = open(path).read()
  found = [json.loads(l[len("BENCH_RESULT "):]) for l in text.splitlines() if l.startswith("BENCH_RESULT ")]
  return found, text.strip().splitlines()[-8:]

out = {"gpu": open(os.path.join(tmp, "gpu.txt")).read().strip(), "config": "sd15", "latents": "64x64x4",
       "ours_dtype": "bfloat16 compute, float32 parameters", "peer": "diffusers-torch fp16, SDPA"}
torch_results, torch_tail = results("torch.txt")
by_batch = {r["batch"]: r for r in torch_results}
for batch in (1, 8):
  found, tail = results(f"ours_{batch}_cudnn.txt")
  if not found:  # the fallback to XLA's attention, if it ran
    found, fallback_tail = results(f"ours_{batch}_xla.txt")
    tail = {"cudnn": tail, "xla": fallback_tail}
  entry = {"ours": found[0] if found else {"error": tail},
           "diffusers_torch": by_batch.get(batch, {"error": torch_tail})}
  ours, peer = entry["ours"], entry["diffusers_torch"]
  entry["ours_over_torch"] = {k[:-3]: round(ours[k] / peer[k], 3) for k in ("fwd_ms", "train_ms")
                              if isinstance(ours.get(k), (int, float)) and isinstance(peer.get(k), (int, float))}
  out[f"batch_{batch}"] = entry
text = json.dumps(out, indent=2)
print(text)
open(out_path, "w").write(text + "\n")
EOF
