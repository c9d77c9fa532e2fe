#!/usr/bin/env bash
# SD 1.5 UNet on one NVIDIA GPU (H100 / H200), 512x512 images (64x64x4 latents), batch 1 and 8:
# ours (JAX/Flax, bf16 compute, fp32 parameters) and diffusers (PyTorch, fp16, SDPA) in the same run,
# forward and train step (forward + backward + AdamW) medians, written as one JSON file.
#
#   JAX_PYTHON=/opt/jax-venv/bin/python TORCH_PYTHON=/opt/torch-venv/bin/python \
#     bash benchmarks/gpu.sh [benchmarks/results/gpu.json]
#
# Installs nothing and needs no network. It budgets about 7 minutes: ours ~2 min per batch size
# (compilation included), diffusers ~1.5 min for both. A part whose python is missing is skipped
# and the reason written to the JSON.
#
# Wheels that must be carried to the machine (no network there), into two virtual environments:
#   JAX_PYTHON:   jax==0.10.2 jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 and the
#                 NVIDIA wheels they pull (nvidia-cublas-cu12 nvidia-cuda-cupti-cu12 nvidia-cuda-nvcc-cu12
#                 nvidia-cuda-runtime-cu12 nvidia-cudnn-cu12 nvidia-cufft-cu12 nvidia-cusolver-cu12
#                 nvidia-cusparse-cu12 nvidia-nccl-cu12 nvidia-nvjitlink-cu12), flax==0.12.8 optax==0.2.8
#                 ml_collections numpy pillow safetensors tqdm, then this repository:
#                 `pip install --no-index --find-links wheels/ ... && pip install --no-deps -e .`
#   TORCH_PYTHON: torch==2.13.0 (a CUDA 12 build, with its nvidia-* wheels), diffusers transformers
#                 safetensors huggingface_hub numpy pillow.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu.json}
JAX_PYTHON=${JAX_PYTHON:-python3}
TORCH_PYTHON=${TORCH_PYTHON:-}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$(dirname "$OUT")"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$TMP/gpu.txt" 2>&1 || true

# Ours: one process per batch size (its device peak memory is its own). remat "none": the card has room.
for batch in 1 8; do
  if command -v "$JAX_PYTHON" > /dev/null; then
    timeout 160 "$JAX_PYTHON" benchmarks/unet.py --worker ours --configs sd15 --batch "$batch" \
      --dtype bfloat16 --remat none --repeats 10 > "$TMP/ours_$batch.txt" 2>&1 || echo "exit $?" >> "$TMP/ours_$batch.txt"
  else
    echo "JAX_PYTHON=$JAX_PYTHON not found" > "$TMP/ours_$batch.txt"
  fi
done

# diffusers on PyTorch, fp16 with scaled_dot_product_attention, both batch sizes in one process.
if [ -n "$TORCH_PYTHON" ] && command -v "$TORCH_PYTHON" > /dev/null; then
  timeout 140 "$TORCH_PYTHON" benchmarks/gpu_peer_torch.py --batch 1,8 --repeats 10 > "$TMP/torch.txt" 2>&1 \
    || echo "exit $?" >> "$TMP/torch.txt"
else
  echo "TORCH_PYTHON=${TORCH_PYTHON:-unset} not found" > "$TMP/torch.txt"
fi

# Collect: one JSON with each part's results (or the tail of its output) and the ratios ours / diffusers.
python3 - "$TMP" "$OUT" <<'EOF'
import json, os, sys
tmp, out_path = sys.argv[1], sys.argv[2]

def results(name):
  text = open(os.path.join(tmp, name)).read()
  found = [json.loads(l[len("BENCH_RESULT "):]) for l in text.splitlines() if l.startswith("BENCH_RESULT ")]
  return found, text.strip().splitlines()[-8:]

out = {"gpu": open(os.path.join(tmp, "gpu.txt")).read().strip(), "config": "sd15", "latents": "64x64x4",
       "ours_dtype": "bfloat16 compute, float32 parameters", "peer": "diffusers-torch fp16, SDPA"}
torch_results, torch_tail = results("torch.txt")
by_batch = {r["batch"]: r for r in torch_results}
for batch in (1, 8):
  found, tail = results(f"ours_{batch}.txt")
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
