"""Fine-tunes the UNet of Stable Diffusion 1.5 on your own captioned images, on GPUs or a TPU pod.

The VAE, the text encoder, the tokenizer, the noise schedule and the initial UNet come from a
diffusers-format directory (`config.diffusion.init_from`); only the UNet trains (bfloat16 compute,
float32 parameters and AdamW state, FSDP-sharded, rematerialised). The EMA weights are exported to
<workdir>/model at the end, ready for `sample.py --model <workdir>`.

Data: a folder of images with captions (`image_folder`: one `<name>.txt` or a metadata.jsonl next to
the images), or a TFDS catalog data set (`--config.data.name tfds:<name>`, see diffusion_jax.data).

One machine with 8 GPUs (or a single TPU VM host):
  python train.py --config configs/sd15.py --workdir /mnt/runs/sd15 \
      --config.diffusion.init_from /mnt/models/stable-diffusion-v1-5 --config.data.path /mnt/data/images

A TPU pod slice (e.g. v4-32: 4 hosts x 4 chips) runs the same command on every host at once; JAX's
distributed runtime finds its peers by itself on Cloud TPU (and under SLURM or Open MPI; elsewhere set
JAX_COORDINATOR_ADDRESS, and JAX_NUM_PROCESSES / JAX_PROCESS_ID for each process):
  gcloud compute tpus tpu-vm ssh my-pod --zone us-central2-b --worker=all --command \
      "cd diffusion_jax && python train.py --config configs/sd15.py --workdir /mnt/runs/sd15 \
       --config.diffusion.init_from /mnt/models/stable-diffusion-v1-5 --config.data.path /mnt/data/images"
Every host must see the same --workdir (a shared file system: NFS, Filestore, gcsfuse) and the data;
each host reads its own shard of every batch. Rerunning the command resumes from the newest checkpoint.

Memory: `mesh.fsdp` shards parameters, gradients and optimizer state over that many devices (the
batch is split over all of them); raise it if the UNet's 860M parameters (14 GB with AdamW state in
float32) do not fit, lower it for less communication. `batch_size` is global; `microbatches`
accumulates gradients when a device cannot hold its share of the batch at once.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.stages = ("diffusion",)
  config.dtype = "bfloat16"
  config.mesh.update(data=-1, fsdp=4)
  config.keep_checkpoints = 3

  config.data.name = "image_folder"  # or "tfds:<name>" with image_key / caption_key below
  config.data.path = ""  # the image folder (--config.data.path)
  config.data.caption_key = "text"  # caption field of metadata.jsonl / the .txt sidecars
  config.data.strict = False  # skip unreadable images instead of failing
  config.data.verify_images = True  # open every image once when indexing the folder
  config.data.image_size = 512
  config.data.worker_count = 8  # grain worker processes decoding and resizing images

  d = config.diffusion
  d.update(steps=20_000, batch_size=256, microbatches=1, learning_rate=1e-5, warmup_steps=500,
           end_lr_factor=1.0, weight_decay=1e-2, grad_clip_norm=1.0, ema_decay=0.9999,
           log_every=50, eval_every=0, checkpoint_every=1000)
  d.init_from = ""  # the diffusers-format Stable Diffusion directory (--config.diffusion.init_from)
  d.prediction_type = ""  # keep the directory's (epsilon for SD 1.x)
  d.min_snr_gamma = 5.0
  d.caption_dropout = 0.1
  d.cache = False  # encode images and captions at every step (the data set is too large to cache)
  d.export_every_checkpoint = False  # the final export only (3.4 GB of UNet weights)
  d.unet.remat = "resnet_and_transformer"  # recompute activations in the backward pass
  d.xla_scheduler = "memory"  # on the CPU: free each gradient after its update (no effect on TPU/GPU)
  d.sample.eval_examples = 0  # no `shapes` evaluator for real images
  return config
