"""Training: one pure `train_step(state, batch, rng) -> (state, metrics)` per stage, and the loop around it.

  state.py        TrainState (params, AdamW state, EMA, counters), EMA update
  optim.py        AdamW with warmup + cosine decay and gradient clipping
  step.py         gradient accumulation, non-finite skipping, the generic train step
  autoencoder.py  stage "autoencoder": reconstruction + KL loss, PSNR evaluation
  clip.py         stage "clip": symmetric InfoNCE, zero-shot and retrieval evaluation
  diffusion.py    stage "diffusion": eps/v loss on frozen VAE latents and text states, caching, sampling
  stages.py       the stages in one table: name -> builder (model, loss, data, evaluation), checkpoint item
  loop.py         shapes-first init or restore, the jitted step, the loop, checkpoints, metrics
  export.py       atomic diffusers-format export of <workdir>/model
  validate.py     configuration checks made before anything compiles
  data.py         grain iterators, global batches, evaluation batches

`train.py` at the repository root strings these together.
"""
