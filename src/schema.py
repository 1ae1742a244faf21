"""The configuration schema: one dataclass per section, holding every key's type and default.

Each field's comment (on its line, or the comment lines right above it) is its one-line
meaning: `python -m src.train --help-config` prints them (`src.config.describe`), and a
test keeps every key described. Presets in configs/ hold only what differs; loading,
checking and the listing are `src.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

# Tables that choice-valued fields name. Each is the one list of its names: the field's
# Literal type is built from it, so OmegaConf rejects any other value at load time.
VARIANTS = {  # model.variant -> DiT sizes (mlp: the MLP width where it is not width * mlp_ratio)
    "tiny": dict(depth=2, width=64, heads=4),
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "XL": dict(depth=28, width=1152, heads=16),
    # Wan 2.1 text-to-video (diffusers WanTransformer3DModel; import: model.init_from, src.wan)
    "wan2.1-t2v-1.3b": dict(depth=30, width=1536, heads=12, mlp=8960),
    "wan2.1-t2v-14b": dict(depth=40, width=5120, heads=40, mlp=13824),
}
# model.remat -> what the backward pass keeps (full: layer inputs alone): a jax.checkpoint_policies member, or (factory,
# kwargs) for a factory (jax's, else dit.REMAT_FACTORIES). offload_*: to host memory; block_in: the tagged layer input.
_HOST = dict(offload_src="device", offload_dst="pinned_host")
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "checkpoint_dots",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
    "offload_dots_no_batch": ("offload_dot_with_no_batch_dims", _HOST),
    "offload_inputs": ("save_and_offload_only_these_names",
                       dict(names_which_can_be_saved=(), names_which_can_be_offloaded=("block_in",), **_HOST)),
    "attention": ("save_attention", {}),  # keep attention's results on the device, recompute the rest
    "offload_attention": ("save_attention", dict(offloaded_names=("block_in",), **_HOST)),  # MaxDiffusion's
}
# model.attention: auto (splash on TPU, else xla) | xla | splash (TPU Pallas) | flash (TPU Pallas,
# skips blocks of other examples in a packed row) | cudnn (GPU flash).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "flash")
Dtype = Literal["float32", "bfloat16"]


@dataclass
class MeshConfig:
  """Device mesh. One axis may be -1: it takes the devices the others leave."""

  data: int = 1  # data-parallel ways within a slice (replicas of the model)
  fsdp: int = -1  # ways the parameters, gradients and optimizer state are sharded (ZeRO-3/FSDP); -1: the rest
  sequence: int = 1  # context-parallel ways: the token sequence split across devices (model.context_parallel)
  tensor: int = 1  # tensor-parallel ways: attention heads and MLP width split across devices
  # Multislice: how many slices (joined by the data-center network) each axis spans;
  # the product is the slice count, -1 takes the rest. Default: only `data` crosses
  # slices; dcn_fsdp > 1 also shards the model across them. Ignored on one slice.
  dcn_data: int = -1
  dcn_fsdp: int = 1  # slices the fsdp axis spans (see dcn_data)
  # Overrides of the logical-axis rules table in `mesh.py`: logical name -> mesh
  # axis, list of mesh axes, or null (replicated).
  rules: Dict[str, Any] = field(default_factory=dict)
  # Multi-host: `distributed: true` calls jax.distributed.initialize(); empty/-1
  # fields are detected from the environment (TPU VMs, SLURM).
  distributed: bool = False
  coordinator_address: str = ""  # host:port of process 0; "": detected
  num_processes: int = -1  # processes (hosts) in the job; -1: detected
  process_id: int = -1  # this process's index; -1: detected


@dataclass
class ModelConfig:
  """Spacetime DiT. `variant` picks depth/width/heads from VARIANTS (src/schema.py)."""

  variant: Literal[tuple(VARIANTS)] = "S"  # named size: depth, width, heads (and MLP width) from VARIANTS
  depth: Optional[int] = None  # overrides the variant when set
  width: Optional[int] = None  # hidden size; overrides the variant when set
  heads: Optional[int] = None  # attention heads; overrides the variant when set
  mlp_ratio: float = 4.0  # MLP width = width * mlp_ratio (unless mlp_dim or the variant sets it)
  mlp_dim: Optional[int] = None  # the MLP width; overrides the variant's and mlp_ratio
  patch: Tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) over the latent grid
  in_channels: int = 4  # latent channels
  num_classes: int = 0  # > 0: class-label table with an extra null class for CFG
  cond_dim: int = 0  # > 0: width of the caption tokens the DiT cross-attends to
  # precomputed: caption embeddings come with the data (records, or the synthetic
  # stand-in encoder); bytes: a byte-level encoder trained with the DiT; umt5: the frozen
  # umT5 of `text.checkpoint` (in the step, or its embeddings from a latent cache), with
  # the empty prompt's embedding as the null caption of guidance, as Wan 2.1 does.
  text_encoder: Literal["precomputed", "bytes", "umt5"] = "precomputed"
  text_depth: int = 2  # layers of the byte-level encoder
  freq_dim: int = 256  # sinusoidal timestep features
  rope_theta: float = 10000.0  # 3D RoPE base frequency
  norm_eps: float = 1e-6  # epsilon of the layer norms
  dtype: Dtype = "float32"  # compute dtype; parameters stay float32
  scan_layers: bool = True  # lax.scan over stacked layers; false: unrolled loop
  # What the backward pass keeps (REMAT_POLICIES). dots_no_batch (the projections'
  # outputs) measured fastest on CPU with scan: stacking every residual of a scanned
  # layer costs more memory traffic than recomputing the elementwise work (docs/benchmarks.md).
  remat: Literal[tuple(REMAT_POLICIES)] = "dots_no_batch"
  attention: Literal[ATTENTION_IMPLS] = "auto"  # cudnn needs dtype bfloat16
  # How self-attention uses mesh.sequence > 1 (docs/architecture.md, "Context parallelism"):
  # ulysses regroups tokens by head (all-to-all; heads / tensor must divide by mesh.sequence);
  # ring keeps tokens split and passes key/value slices around the sequence axis (any
  # degree; blockwise XLA tiles, or the Pallas kernel with model.attention=flash); usp is Ulysses inside
  # groups of ulysses_degree neighbouring devices and a ring across the groups.
  context_parallel: Literal["ulysses", "ring", "usp"] = "ulysses"
  ulysses_degree: int = 0  # usp: devices per Ulysses group; 0: the most that divide mesh.sequence and the heads
  # FSDP weight gradients: compiler = GSPMD's reduce-scatter, which the TPU compiler lowers on 8+
  # chips to an all-reduce and a slice or permutes (about 2x the bytes; its cost model prices that
  # as faster); torus = one reduce-scatter per torus dimension (src.fsdp: the ideal bytes, priced
  # 4-8% slower by the compiler on v5p-256; for measuring on a real pod). CPU/GPU: no difference.
  gradient_reduce: Literal["compiler", "torus"] = "compiler"
  # A fresh run starts from these weights: a diffusers WanTransformer3DModel directory (or a
  # root with transformer/), or its Orbax copy (src.convert wan). A resume never reads it.
  init_from: str = ""


@dataclass
class VAEConfig:
  """Causal 3D video VAE in the Wan 2.1 layout (diffusers `AutoencoderKLWan` names). The
  defaults are the published Wan 2.1 VAE's sizes: 4x temporal, 8x spatial, 16 channels."""

  enabled: bool = False  # false: the data are used as latents directly
  in_channels: int = 3  # pixel channels (3: RGB)
  base_dim: int = 96  # channels of the first encoder stage
  z_dim: int = 16  # latent channels (the DiT's model.in_channels)
  # channel multiplier per stage; len - 1 spatial 2x downsamplings
  dim_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
  num_res_blocks: int = 2  # residual blocks per stage
  # per downsampling: also halve time
  temporal_downsample: List[bool] = field(default_factory=lambda: [False, True, True])
  norm_eps: float = 1e-6  # epsilon of the RMS norms
  # per-channel mean of the latents, z_norm = (z - mean) / std; empty: 0
  latents_mean: List[float] = field(default_factory=list)
  latents_std: List[float] = field(default_factory=list)  # per-channel std of the latents; empty: 1
  # Weights: a diffusers AutoencoderKLWan directory (config.json + safetensors), an Orbax directory written by
  # `src.convert vae`, or a task=vae run directory (its newest checkpoint, or a step directory). Empty: random init.
  checkpoint: str = ""
  checkpoint_weights: Literal["ema", "raw"] = "ema"  # vae.checkpoint is a task=vae run: which of its weights
  chunk_frames: int = 4  # frames per chunk after the first in chunked encode/decode
  dtype: Dtype = "float32"  # compute dtype; parameters stay float32
  # task=vae (training the VAE itself): no perceptual/adversarial terms, their pretrained networks cannot be downloaded
  l1_weight: float = 1.0  # task=vae: weight of the L1 reconstruction loss
  l2_weight: float = 0.0  # task=vae: weight of the L2 reconstruction loss
  kl_weight: float = 1e-6  # task=vae: weight of the KL term

  # The VAE's geometry: every caller asks these, none re-derives them.

  def compression(self) -> tuple[int, int]:
    """(temporal, spatial) downsampling factors: (4, 8) at Wan 2.1 sizes."""
    n_down = len(self.dim_mult) - 1
    return 2 ** sum(bool(d) for d in self.temporal_downsample[:n_down]), 2 ** n_down

  def latent_shape(self, shape) -> tuple[int, int, int]:
    """Pixel (T, H, W) -> latent (1 + (T-1)/4, H/8, W/8) at the default sizes."""
    ft, fs = self.compression()
    t, h, w = shape
    return 1 + (t - 1) // ft, h // fs, w // fs

  def clip_error(self, shape) -> str | None:
    """Why a pixel clip (T, H, W) cannot be encoded, or None: the causal VAE codes the
    first frame alone and then groups of `ft` frames, so T = 1 + ft * k."""
    (ft, fs), (t, h, w) = self.compression(), shape
    if (t - 1) % ft or h % fs or w % fs:
      return f"video of {t} frames at {h}x{w}: the VAE needs 1 + {ft}k frames and sides divisible by {fs}"
    return None


@dataclass
class TextConfig:
  """The frozen umT5 text encoder (`model.text_encoder=umt5`)."""

  # The Hugging Face layout: config.json + safetensors (the `text_encoder/` folder of the Wan
  # 2.1 diffusers repositories), or a model root holding `text_encoder/` and `tokenizer/`.
  checkpoint: str = ""
  tokenizer: str = ""  # spiece.model / tokenizer.json directory; "": found beside the checkpoint
  dtype: Dtype = "float32"  # compute dtype; parameters stay float32


@dataclass
class LoRAConfig:
  """Low-rank adapters (src.lora): rank 0 trains every parameter; rank > 0 trains only
  adapters on the `targets` (group names of lora.GROUPS: attn, cross, ffn, time, text;
  or regular expressions over layer paths such as blocks.attn.q), the base frozen."""

  rank: int = 0  # adapter rank; 0: full fine-tuning, every parameter trained
  alpha: float = 0.0  # the update is (alpha / rank) x A B; 0: alpha = rank
  dropout: float = 0.0  # on the adapters' input, in training
  # what gets adapters: lora.GROUPS names or regular expressions over layer paths
  targets: List[str] = field(default_factory=lambda: ["attn", "cross", "ffn"])
  base_dtype: Dtype = "float32"  # the frozen base's storage; bfloat16 halves it


@dataclass
class ObjectiveConfig:
  """Training objective: rectified flow, or DDPM-family diffusion."""

  # flow: rectified flow (velocity); diffusion: DDPM family (see prediction)
  kind: Literal["flow", "diffusion"] = "flow"
  # Timestep sampling (flow): t ~ logit-normal(mean, std) or uniform on [0, 1], then t' = a t / (1 + (a - 1) t).
  timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
  logit_mean: float = 0.0  # mean of the logit-normal timestep density
  logit_std: float = 1.0  # std of the logit-normal timestep density
  shift: float = 1.0  # flow timestep shift a (SD3/Wan; > 1 favours noisier times)
  shift_base_tokens: int = 0  # > 0: resolution-dependent shift a = shift * sqrt(tokens / shift_base_tokens)
  # Diffusion (DDPM family), 1000 discrete steps.
  schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
  beta_start: float = 0.0001  # diffusion: first beta of the linear/scaled_linear schedule
  beta_end: float = 0.02  # diffusion: last beta
  # diffusion: what the model predicts (noise, velocity or the clean latent)
  prediction: Literal["eps", "v", "x0"] = "eps"
  num_train_timesteps: int = 1000  # diffusion: discrete training timesteps
  min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting
  # Both. token: mean over real tokens; example: mean of per-example means
  loss_reduction: Literal["token", "example"] = "token"
  cond_dropout: float = 0.1  # probability an example's label/caption is replaced by the null one


@dataclass
class ConditioningConfig:
  """The training mix of conditioning modes (`src.frames`): relative weights per example; frames are latent frames."""

  t2v: float = 1.0  # no frame given: text (or label) to video
  i2v: float = 0.0  # the first latent frame given: image to video
  continuation: float = 0.0  # the first k latent frames given, k uniform in continuation_frames
  keyframes: float = 0.0  # the first and the last latent frame given
  independent: float = 0.0  # no frame given, every frame at its own noise level (diffusion forcing)
  continuation_frames: List[int] = field(default_factory=lambda: [1, 4])  # [min, max] k, latent frames
  noise: float = 0.0  # > 0: conditioning frames noised at a level uniform in [0, noise] (noise augmentation)


@dataclass
class OptimConfig:
  """AdamW with linear warmup, cosine (or constant) decay, global-norm clipping, EMA."""

  lr: float = 1e-4  # peak learning rate (AdamW)
  warmup_steps: int = 100  # linear warm-up from 0 to lr
  # after warm-up: cosine down to lr * min_lr_ratio at train.steps, or constant
  decay: Literal["cosine", "constant"] = "cosine"
  min_lr_ratio: float = 0.1  # cosine's final lr / lr
  weight_decay: float = 0.0  # AdamW decoupled weight decay (kernels only, not norms or biases)
  b1: float = 0.9  # Adam first-moment decay
  b2: float = 0.999  # Adam second-moment decay
  eps: float = 1e-8  # Adam epsilon
  clip_norm: float = 1.0  # global gradient-norm clipping threshold
  ema_decay: float = 0.9999  # weight the parameter EMA keeps per step (time constant ~1 / (1 - decay) steps)
  # true: update n keeps min(ema_decay, (1 + n) / (10 + n)), so a short run's EMA follows the weights it has
  ema_warmup: bool = True


@dataclass
class SyntheticConfig:
  """Procedural moving-shape clips, made deterministically from the seed."""

  num_examples: int = 4096  # clips in the synthetic set (the held-out split has its own)
  num_classes: int = 10  # labels: the first (kind, colour) combinations (the caption also names the motion)
  max_shapes: int = 2  # most shapes per clip
  # pixels a frame, drawn uniformly in [lo, hi] per clip, at a short side of 16 (scaled above it)
  speed: tuple[float, float] = (0.5, 1.5)


@dataclass
class DataConfig:
  """Where examples come from, their shape, and how they are batched. Without a VAE the
  clips are the latents: `frames/height/width/channels` give the DiT's latent grid."""

  source: str = "synthetic"  # synthetic | folder (src.data.build) | latents (src.encode) | mixture | tfds:<name>
  frames: int = 4  # frames per clip: pixel frames with a VAE, else latent frames
  height: int = 16  # clip height: pixels with a VAE, else latent rows
  width: int = 16  # clip width: pixels with a VAE, else latent columns
  channels: int = 4  # channels of the clips: 3 for pixels, the latent channels otherwise
  batch_size: int = 8  # global rows per step
  seq_len: int = 0  # row length L in tokens; 0: exactly one example of the configured shape
  max_segments: int = 8  # K: most examples one row holds
  # Mixed shapes (NaViT-style packing). area > 0: every example draws its own
  # (T, H, W): H*W <= area (pixels with a VAE, else latents) at one of the aspect ratios
  # (W/H), T from frame_counts, or a 1-frame image with probability image_fraction.
  area: int = 0
  # area > 0: the aspect ratios (W/H) examples draw from
  aspect_ratios: List[float] = field(default_factory=lambda: [9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9])
  # clip lengths to draw from (video frames, 1 + 4k, with a VAE; else latent frames); empty: `frames` for every clip
  frame_counts: List[int] = field(default_factory=list)
  image_fraction: float = 0.0  # area > 0: probability an example is a 1-frame image
  # Packing: best-fit-decreasing over a buffer of examples holding pack_buffer
  # batches' worth of tokens; an example that waited pack_max_wait batches goes first.
  pack_buffer: float = 2.0
  pack_max_wait: int = 4  # batches an example may wait in the packing buffer before it goes first
  token_drop: float = 0.0  # NaViT token dropping: fraction of each example's tokens dropped
  text_len: int = 8  # conditioning tokens per example (Lc per segment)
  num_workers: int = 0  # grain worker processes; 0 = in the main process
  prefetch: int = 2  # batches prepared ahead of the step
  synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
  # Real data: source folder (built by `python -m src.data.build`), tfds:<name> (any
  # prepared ArrayRecord tfds dataset) or mixture. Clips are decoded in the workers.
  data_dir: str = ""  # tfds data_dir; folder: the builder's --out; "": tfds default
  train_split: str = "train"  # tfds split names (slicing allowed, e.g. "train[5%:]")
  val_split: str = "validation"  # held-out split (validation loss, samples)
  video_key: str = ""  # feature holding the clip: encoded bytes or uint8 array; "": video, else image
  fps: float = 0.0  # resample clips to this frame rate first; 0: the file's own rate
  frame_stride: int = 1  # then keep every n-th frame
  random_flip: bool = True  # left-right, drawn per example
  require_caption: bool = True  # skip (and count) records with an empty caption
  probe_records: int = 32  # at start-up, error if none of the first N records is usable
  log_every: int = 100  # batches between throughput logs; 0: never
  # source=mixture: [{source: ..., weight: ..., data_dir: ...}, ...], interleaved by weight.
  mixture: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainConfig:
  """The loop: its length, logging, checkpoints, samples and validation during training."""

  steps: int = 1000  # total steps; sets the learning-rate schedule
  # > 0: stop (after saving) once this invocation ran that many steps (time-sliced jobs); rerun resumes.
  run_steps: int = 0
  log_every: int = 10  # steps between metric lines (console, metrics.jsonl, TensorBoard)
  ckpt_every: int = 200  # steps between checkpoints (and one at the end)
  keep_checkpoints: int = 3  # newest checkpoints kept
  max_bad_steps: int = 10  # non-finite steps in a row (each skipped) before the run stops with exit 1
  async_checkpoint: bool = True  # write checkpoints in the background while training continues
  compile_cache: str = "auto"  # persistent XLA cache dir: auto = {workdir}/compile_cache off CPU, "" = off
  tensorboard: bool = True  # write TensorBoard events under {workdir}/tensorboard
  # Weights & Biases project for the metrics, samples and config ("": off; needs the `wandb` extra). The W&B run
  # id is saved in {workdir}/wandb_id, so a resumed run continues its W&B run.
  wandb: str = ""
  wandb_mode: Literal["online", "offline"] = "online"  # offline: the W&B run stays in {workdir}/wandb for `wandb sync`
  # Samples during training (0: never): PNG grid + GIFs under {workdir}/samples/ and
  # TensorBoard, from sample_weights, for the first sample_count held-out examples.
  sample_every: int = 0
  sample_weights: Literal["ema", "raw"] = "ema"  # which weights the in-training samples use (named in the file)
  sample_count: int = 4  # held-out examples sampled each time
  sample_steps: int = 25  # sampler steps per sample
  sample_guidance: float = 4.0  # classifier-free guidance scale of the samples (1: none)
  eval_every: int = 0  # validation loss at fixed timesteps on held-out batches (SD3-style; 0: never)
  eval_batches: int = 2  # held-out batches per validation
  eval_times: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # fractions of the noise range


@dataclass
class Config:
  """A run: what is trained, on what data, on which mesh."""

  workdir: str = "runs/default"  # run directory (local or gs://): config, metrics, checkpoints; rerun to resume
  seed: int = 0  # seed of the init, the data order and the noise
  task: Literal["dit", "vae"] = "dit"  # what is trained: src.tasks.make_task
  model: ModelConfig = field(default_factory=ModelConfig)
  vae: VAEConfig = field(default_factory=VAEConfig)
  text: TextConfig = field(default_factory=TextConfig)
  lora: LoRAConfig = field(default_factory=LoRAConfig)
  objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
  conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
