"""The default run: autoencoder, CLIP and text-conditioned UNet on the built-in `shapes` data.

Sized for a 2-core CPU: the three stages together take 23-30 minutes there (plus the one-time
generation of `shapes`); benchmarks/RESULTS.md records what the run reaches (reconstruction PSNR,
zero-shot accuracy, how well 20-step dpmpp_2m samples match their captions).

  python train.py                                   # this config, into runs/default
  python train.py --config configs/default.py --workdir runs/mine --config.diffusion.steps 6000
  python sample.py "a large red circle on the left" # draws with runs/default/model

Every other config starts from this one and overrides what differs.
"""
import ml_collections
from ml_collections import config_dict


def training(*, steps: int, batch_size: int, learning_rate: float, warmup_steps: int, eval_every: int = 0,
             checkpoint_every: int = 500, log_every: int = 50, ema_decay: float | None = None,
             weight_decay: float = 0.0) -> ml_collections.ConfigDict:
  """The fields every stage shares: length, batch, optimizer and intervals."""
  c = ml_collections.ConfigDict()
  c.steps = steps  # optimizer steps of the stage
  c.batch_size = batch_size  # global batch: all processes, devices and micro-batches together
  c.microbatches = 1  # gradient accumulation: the batch runs as this many sequential micro-batches
  c.learning_rate = learning_rate  # peak AdamW learning rate
  c.warmup_steps = warmup_steps  # linear warmup from 0, then cosine decay to end_lr_factor * learning_rate
  c.end_lr_factor = 0.05  # final learning rate as a fraction of the peak
  c.weight_decay = weight_decay  # decoupled weight decay on matrices and conv kernels
  c.b1 = 0.9  # Adam's first-moment decay
  c.b2 = 0.99  # Adam's second-moment decay
  c.eps = 1e-8  # Adam's epsilon
  c.grad_clip_norm = 1.0  # clip the global gradient norm to this (<= 0: no clipping)
  if ema_decay is not None:
    c.ema_decay = ema_decay  # EMA of the weights (0: off), used for sampling and export
  c.log_every = log_every  # steps between lines of metrics.jsonl / TensorBoard points
  c.eval_every = eval_every  # steps between evaluations (0: only at the end of the stage)
  c.checkpoint_every = checkpoint_every  # steps between checkpoints (the stage's last step always saves)
  c.xla_scheduler = "default"  # "memory": on the CPU, update each parameter as its gradient arrives (less memory)
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds initialisation, data order and every random draw of training
  config.stages = ("autoencoder", "clip", "diffusion")  # trained in this order; finished stages are skipped
  config.dtype = "float32"  # compute dtype ("bfloat16" on GPU/TPU); parameters and optimizer state stay float32
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # device mesh; -1 takes the other devices
  config.max_consecutive_nonfinite = 5  # stop after this many steps in a row with a non-finite loss/gradient
  config.keep_checkpoints = 2  # newest checkpoints kept in <workdir>/checkpoints
  config.compilation_cache_dir = "~/.cache/diffusion_jax/xla"  # XLA's persistent cache ("" disables it)

  config.debug = ml_collections.ConfigDict()
  config.debug.nan_stage = ""  # feed NaN inputs in this stage (tests the non-finite guard) ...
  config.debug.nan_from_step = -1  # ... from this step of the stage ...
  config.debug.nan_steps = 0  # ... for this many steps

  config.data = ml_collections.ConfigDict()
  config.data.name = "shapes"  # "shapes", "image_folder" or "tfds:<name>[/<config>][:<version>]"
  config.data.data_dir = config_dict.placeholder(str)  # TFDS data directory (None: ~/tensorflow_datasets)
  config.data.image_size = 64  # images are resized and centre-cropped to this side
  config.data.train_size = 50_000  # shapes: training examples generated
  config.data.test_size = 2_000  # shapes: test examples generated
  config.data.worker_count = 0  # grain worker processes (0: threads of the training process)

  # Stage 1: the autoencoder. 64x64x3 images <-> 16x16x4 latents.
  config.autoencoder = training(steps=1000, batch_size=32, learning_rate=4e-3, warmup_steps=50)
  ae = config.autoencoder
  # AutoencoderConfig (diffusion_jax/nn/autoencoder.py), field by field.
  ae.model = ml_collections.ConfigDict()
  ae.model.in_channels = 3  # image channels read by the encoder
  ae.model.out_channels = 3  # image channels written by the decoder
  ae.model.latent_channels = 4  # channels of the latent
  ae.model.block_out_channels = (16, 32, 32)  # widths per level; latents are 2**(levels-1) times smaller
  ae.model.layers_per_block = 1  # resnets per encoder level (the decoder has one more)
  ae.model.norm_num_groups = 8  # GroupNorm groups
  ae.model.sample_size = config_dict.placeholder(int)  # None: data.image_size (set by training)
  ae.model.scaling_factor = config_dict.placeholder(float)  # None: 1 / latent std, estimated before the UNet trains
  ae.model.shift_factor = config_dict.placeholder(float)  # subtracted from latents before scaling (None: 0)
  ae.model.latents_mean = config_dict.placeholder(tuple)  # per-channel latent mean (SDXL-style; None: unused)
  ae.model.latents_std = config_dict.placeholder(tuple)  # per-channel latent std (SDXL-style; None: unused)
  ae.model.force_upcast = True  # exported metadata: run this VAE in float32
  ae.model.use_quant_conv = True  # 1x1 conv on the encoder moments
  ae.model.use_post_quant_conv = True  # 1x1 conv on the latents before the decoder
  ae.model.mid_block_add_attention = True  # self-attention in the middle blocks
  ae.model.remat = False  # rematerialise resnets in the backward pass (memory for compute)
  ae.model.attention = "auto"  # mid-block attention: "xla", "cudnn", "cpu_kernel", "cpu_tiles"; "auto": for the devices
  ae.model.upsample_conv_min_side = "auto"  # upsample by one 2x2 conv from this input side (0: matmuls; "auto")
  ae.crop_size = 32  # train on random crops of this side (0: whole images); evaluation uses whole images
  ae.l1_weight = 1.0  # weight of the mean absolute reconstruction error
  ae.l2_weight = 1.0  # weight of the mean squared reconstruction error
  ae.kl_weight = 1e-6  # weight of KL(posterior || N(0, I)) per image element (latent diffusion's 1e-6)
  ae.eval_examples = 500  # test images whose reconstruction PSNR is reported
  ae.eval_batch_size = 100  # images per evaluation batch

  # Stage 2: CLIP. Word-level tokens, a small ViT on 8x8 patches.
  config.clip = training(steps=1500, batch_size=128, learning_rate=2e-3, warmup_steps=50, weight_decay=0.01)
  cl = config.clip
  cl.tokenizer = "shapes_words"  # "shapes_words" (one token per word of the captions) or a tokenizer directory
  cl.max_length = 16  # tokens per caption, begin and end tokens included
  # CLIPConfig (diffusion_jax/nn/clip.py): its two towers field by field; None fields come from the tokenizer,
  # the image size and projection_dim.
  cl.model = ml_collections.ConfigDict()
  cl.model.text = ml_collections.ConfigDict()  # TextEncoderConfig (diffusion_jax/nn/text_encoder.py)
  cl.model.text.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's vocabulary
  cl.model.text.hidden_size = 64  # text transformer width (the UNet's cross-attention width)
  cl.model.text.intermediate_size = 256  # MLP width of the text transformer
  cl.model.text.num_layers = 2  # text transformer blocks
  cl.model.text.num_heads = 2  # text attention heads
  cl.model.text.max_position_embeddings = config_dict.placeholder(int)  # None: clip.max_length
  cl.model.text.hidden_act = "quick_gelu"  # MLP activation: "quick_gelu" or "gelu"
  cl.model.text.layer_norm_eps = 1e-5  # LayerNorm epsilon
  cl.model.text.eos_token_id = config_dict.placeholder(int)  # None: the tokenizer's
  cl.model.text.pad_token_id = config_dict.placeholder(int)  # None: the tokenizer's
  cl.model.text.bos_token_id = config_dict.placeholder(int)  # None: the tokenizer's
  cl.model.text.projection_dim = config_dict.placeholder(int)  # None: clip.model.projection_dim
  cl.model.vision = ml_collections.ConfigDict()  # VisionConfig (diffusion_jax/nn/image_encoder.py)
  cl.model.vision.image_size = config_dict.placeholder(int)  # None: data.image_size
  cl.model.vision.patch_size = 8  # ViT patch side in pixels
  cl.model.vision.num_channels = 3  # image channels
  cl.model.vision.hidden_size = 64  # vision transformer width
  cl.model.vision.intermediate_size = 256  # MLP width of the vision transformer
  cl.model.vision.num_layers = 2  # vision transformer blocks
  cl.model.vision.num_heads = 2  # vision attention heads
  cl.model.vision.hidden_act = "quick_gelu"  # MLP activation: "quick_gelu" or "gelu"
  cl.model.vision.layer_norm_eps = 1e-5  # LayerNorm epsilon
  cl.model.vision.projection_dim = config_dict.placeholder(int)  # None: clip.model.projection_dim
  cl.model.projection_dim = 64  # width of the shared embedding space
  cl.model.logit_scale_init_value = 2.6592  # log(1 / 0.07); the temperature exp(logit_scale) is clamped at 100
  cl.remat = False  # rematerialise the transformer blocks in the backward pass
  cl.max_objects = 1  # train on examples with at most this many objects (0: all); see diffusion_jax/train/clip.py
  cl.mask_duplicate_captions = True  # pairs with identical captions are not negatives of each other
  cl.zero_shot_templates = "captions"  # class prompts: "captions" (all single-object forms) or "short"
  cl.eval_examples = 1000  # test examples for zero-shot (the single-object ones) and retrieval
  cl.eval_batch_size = 250  # examples per evaluation batch

  # Stage 3: the UNet on 16x16x4 latents, conditioned on the CLIP text tower's last hidden states.
  # Colour is the last thing the UNet binds to the text (shape and position come first), so the stage
  # favours many small steps: 1000 steps of 64 draw the right colour half of the time.
  config.diffusion = training(steps=2900, batch_size=32, learning_rate=2e-3, warmup_steps=50, ema_decay=0.995,
                              checkpoint_every=500)
  d = config.diffusion
  d.init_from = config_dict.placeholder(str)  # a diffusers-format SD directory to fine-tune (VAE, text, UNet)
  d.prediction_type = "epsilon"  # "epsilon" or "v_prediction" ("" with init_from: the directory's)
  d.min_snr_gamma = 5.0  # min-SNR-gamma loss weighting (0: plain MSE)
  d.caption_dropout = 0.1  # probability of training on the empty caption (classifier-free guidance)
  d.cache = True  # encode the training images and captions once instead of at every step
  d.cache_examples = 10_000  # training examples cached (-1: all)
  d.encode_batch_size = 250  # images per batch when encoding the cache
  d.scaling_examples = 500  # training images whose latent std sets the VAE's scaling factor
  d.export_every_checkpoint = True  # also export <workdir>/model at each checkpoint (not only at the end)
  # UNetConfig (diffusion_jax/nn/unet.py), field by field. With init_from the architecture is the directory's
  # and only dropout and the fields diffusers' config lacks (remat, implementation choices) apply.
  d.unet = ml_collections.ConfigDict()
  d.unet.sample_size = config_dict.placeholder(int)  # None: the latent side (image_size / the VAE's downsampling)
  d.unet.in_channels = config_dict.placeholder(int)  # None: the VAE's latent channels
  d.unet.out_channels = config_dict.placeholder(int)  # None: the VAE's latent channels
  d.unet.block_out_channels = (32, 64, 64)  # widths per level: 16x16, 8x8, 4x4
  d.unet.layers_per_block = 1  # resnets per down block (up blocks have one more)
  # Cross-attention at 8x8 and 4x4 only: attention over all 256 positions at 16x16 would double the step time.
  d.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")  # one per level
  d.unet.mid_block_type = "UNetMidBlock2DCrossAttn"  # the middle block (None: none)
  d.unet.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")  # deepest first
  d.unet.attention_head_dim = 4  # attention heads per block (diffusers' legacy name)
  d.unet.num_attention_heads = config_dict.placeholder(int)  # heads per block; overrides attention_head_dim
  d.unet.cross_attention_dim = config_dict.placeholder(int)  # None: the text encoder's width
  d.unet.use_linear_projection = False  # linear (SD 2) rather than 1x1 conv (SD 1) transformer projections
  d.unet.transformer_layers_per_block = 1  # transformer blocks per attention block
  d.unet.norm_num_groups = 16  # GroupNorm groups
  d.unet.norm_eps = 1e-5  # GroupNorm epsilon of the resnets and the output norm
  d.unet.flip_sin_to_cos = True  # timestep embedding as [cos, sin]
  d.unet.freq_shift = 0  # downscale_freq_shift of the timestep embedding
  d.unet.only_cross_attention = False  # only False is implemented
  d.unet.center_input_sample = False  # map the input x -> 2x - 1 first
  d.unet.upcast_attention = False  # accepted: softmax is always float32
  d.unet.dropout = 0.0  # dropout in resnets and transformer blocks (training only)
  d.unet.conv_in_kernel = 3  # kernel of conv_in
  d.unet.conv_out_kernel = 3  # kernel of conv_out
  d.unet.time_embedding_dim = config_dict.placeholder(int)  # width of the timestep MLP (None: 4 * first width)
  d.unet.remat = "none"  # rematerialisation: "none", "transformer", "resnet_and_transformer" or a policy name
  d.unet.attention = "auto"  # "xla", "cudnn", "cpu_kernel", "cpu_tiles"; "auto": chosen for the run's devices
  d.unet.ff_chunk_elements = "auto"  # feed-forward in row chunks of about this many activations (0: whole; "auto")
  d.unet.upsample_conv_min_side = "auto"  # upsample by one 2x2 conv from this input side (0: matmuls; "auto")
  d.scheduler = ml_collections.ConfigDict()
  d.scheduler.num_train_timesteps = 1000  # training timesteps T
  d.scheduler.beta_schedule = "scaled_linear"  # "linear", "scaled_linear" or "squaredcos_cap_v2"
  d.scheduler.beta_start = 0.00085  # beta at t = 0
  d.scheduler.beta_end = 0.012  # beta at t = T - 1
  d.scheduler.timestep_spacing = "leading"  # inference timestep spacing written to the exported scheduler
  d.scheduler.steps_offset = 1  # added to "leading" timesteps
  d.scheduler.rescale_betas_zero_snr = False  # rescale to zero terminal SNR (use with v_prediction)
  d.scheduler.class_name = "DPMSolverMultistepScheduler"  # scheduler class named in the export
  d.sample = ml_collections.ConfigDict()
  d.sample.sampler = "dpmpp_2m"  # sampler of the evaluation
  d.sample.steps = 20  # sampling steps
  d.sample.guidance_scale = 4.0  # classifier-free guidance scale
  d.sample.seed = 0  # seed of the initial noise
  d.sample.eval_examples = 256  # test captions sampled and scored (alternately one and two objects)
  d.sample.grid_examples = 32  # samples in the PNG grid
  return config
