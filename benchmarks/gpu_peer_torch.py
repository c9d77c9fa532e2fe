"""diffusers' SD 1.5 UNet on one CUDA GPU in fp16 with PyTorch SDPA: forward and train-step medians.

  python benchmarks/gpu_peer_torch.py --batch 1,8 --repeats 10

The forward runs the fp16 model; the train step is mixed precision as usually trained (fp32 weights,
fp16 autocast, GradScaler, AdamW), loss = MSE(prediction, input) as in the CPU peers' script.
Prints one `BENCH_RESULT {json}` line per batch size. Run by benchmarks/gpu.sh.
"""
import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8)


def median_ms(fn, repeats):
  fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2] * 1e3


def run(batch: int, repeats: int) -> dict:
  torch.manual_seed(0)
  device = torch.device("cuda")
  x = torch.randn(batch, 4, 64, 64, device=device)
  t = torch.randint(0, 1000, (batch,), device=device)
  context = torch.randn(batch, 77, 768, device=device)
  out = {"peer": "diffusers-torch", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "batch": batch}

  model = UNet2DConditionModel(**SD15).to(device, torch.float16).eval()
  model.set_attn_processor(AttnProcessor2_0())  # torch.nn.functional.scaled_dot_product_attention
  x16, c16 = x.half(), context.half()

  @torch.no_grad()
  def forward():
    model(x16, t, c16)

  out["fwd_ms"] = median_ms(forward, repeats)
  out["fwd_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
  del model
  torch.cuda.empty_cache()
  torch.cuda.reset_peak_memory_stats()

  model = UNet2DConditionModel(**SD15).to(device).train()
  model.set_attn_processor(AttnProcessor2_0())
  opt = torch.optim.AdamW(model.parameters(), 1e-4)
  scaler = torch.amp.GradScaler("cuda")

  def train():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16):
      loss = (model(x, t, context).sample.float() - x).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()

  out["train_ms"] = median_ms(train, repeats)
  out["train_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
  del model, opt
  torch.cuda.empty_cache()
  torch.cuda.reset_peak_memory_stats()
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", default="1,8")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  for batch in (int(b) for b in args.batch.split(",")):
    print("BENCH_RESULT " + json.dumps(run(batch, args.repeats)), flush=True)


if __name__ == "__main__":
  main()
