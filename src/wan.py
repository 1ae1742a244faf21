"""Wan 2.1 text-to-video transformers (diffusers `WanTransformer3DModel`) as our DiT.

The DiT (`models.dit`) has Wan 2.1's block layout, so the published weights map one to
one onto its parameters; this module is that map, both ways, with no PyTorch:

- torch Linear weights [out, in] become our kernels [*in, *out] (q/k/v keep a heads
  axis); the Conv3d patch embedding [D, C, pt, ph, pw] becomes a Dense on tokens whose
  values are ordered (pt, ph, pw, C), as `models.patch` cuts them; the 1-row
  modulation tables lose their leading 1; per-layer tensors stack into the scanned
  layer axis.
- Wan's RoPE rotates neighbouring pairs (2i, 2i+1) of the head dim; ours rotates
  (i, i + Dh/2). Self-attention q/k (weights, biases and their RMSNorm scales) are
  permuted on import so that Wan's pair i lands on our (i, i + Dh/2): scores are
  sums over the head dim, so the same permutation of q and k changes nothing else.
  Cross-attention has no RoPE and is taken as it is.
- The null caption: Wan's guidance uses a negative prompt's embedding, not a learned
  null. A model whose captions come precomputed keeps our learned `null_cond`; it has
  no Wan counterpart, starts at zero on import and is not exported.

Reading goes through `src.weights`: each process reads only the blocks its devices
hold (memory-mapped safetensors), and every tensor must be used exactly once with the
expected shape (a `WeightsError` naming it otherwise). `save_orbax` writes our Orbax
copy (items `params` and `config`: the diffusers config.json), which loads faster;
`export_diffusers` writes the diffusers layout back (config.json + safetensors shards
+ index) for diffusers, ComfyUI and friends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import save_file

from src import lora as lora_lib
from src import mesh as mesh_lib
from src import weights
from src.config import ConfigError, ModelConfig
from src.models.dit import DiT, dimensions, mlp_width
from src.pretrained import DIFFUSERS_CONFIG, DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, CheckpointConfigError

log = logging.getLogger(__name__)

SUBFOLDER = "transformer"  # of a diffusers model root
CLASS_NAME = "WanTransformer3DModel"
ROPE_THETA = 10000.0  # fixed in diffusers' WanRotaryPosEmbed
OURS_ONLY = (("null_cond",),)  # parameters with no Wan counterpart: zero on import, not exported
MAX_SHARD_BYTES = 5 * 10**9  # diffusers' default max_shard_size ("5GB")


# ------------------------------------------------------------------ configs


def model_config(d: dict, base: ModelConfig | None = None) -> ModelConfig:
  """`base` (default: umT5 captions, our other defaults) with the sizes of a diffusers
  WanTransformer3DModel config.json `d`. Configs of features we lack are refused."""
  unsupported = {"image_dim": None, "added_kv_proj_dim": None, "qk_norm": "rms_norm_across_heads",
                 "cross_attn_norm": True, "pos_embed_seq_len": None}
  bad = [f"{k}={d.get(k)!r}" for k, v in unsupported.items() if d.get(k, v) != v]
  if d.get("out_channels") not in (None, d["in_channels"]):
    bad.append(f"out_channels={d['out_channels']} != in_channels={d['in_channels']}")
  if bad:
    raise ConfigError(f"unsupported Wan transformer config ({', '.join(bad)}): only the text-to-video layout "
                      "(no image conditioning, RMSNorm across heads, affine cross-attention norm) is supported.")
  base = base or ModelConfig(text_encoder="umt5")
  heads = d["num_attention_heads"]
  return dataclasses.replace(
      base, depth=d["num_layers"], width=heads * d["attention_head_dim"], heads=heads, mlp_dim=d["ffn_dim"],
      patch=tuple(d["patch_size"]), in_channels=d["in_channels"], cond_dim=d["text_dim"], freq_dim=d["freq_dim"],
      norm_eps=d["eps"], rope_theta=ROPE_THETA)


def diffusers_config(m: ModelConfig) -> dict:
  """The diffusers config.json of our model `m` (the inverse of `model_config`)."""
  depth, width, heads = dimensions(m)
  return {"_class_name": CLASS_NAME, "_diffusers_version": "0.42.1", "patch_size": list(m.patch),
          "num_attention_heads": heads, "attention_head_dim": width // heads, "in_channels": m.in_channels,
          "out_channels": m.in_channels, "text_dim": m.cond_dim, "freq_dim": m.freq_dim, "ffn_dim": mlp_width(m),
          "num_layers": depth, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": m.norm_eps,
          "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


def check_fits(m: ModelConfig, d: dict, source: str | Path) -> None:
  """CheckpointConfigError naming every model setting that differs from the checkpoint's
  (a silently different model would load nothing that fits)."""
  if m.num_classes or m.text_encoder == "bytes" or not m.cond_dim:
    raise CheckpointConfigError(f"{source}: a Wan transformer is caption-conditioned by precomputed or umT5 "
                                "embeddings: set model.num_classes=0, model.cond_dim>0 and model.text_encoder to "
                                f"precomputed or umt5 (got {m.num_classes}, {m.cond_dim}, {m.text_encoder}).")
  theirs = model_config(d, m)
  keys = {"model.depth": lambda c: dimensions(c)[0], "model.width": lambda c: dimensions(c)[1],
          "model.heads": lambda c: dimensions(c)[2], "model.mlp_dim": mlp_width,
          "model.patch": lambda c: tuple(c.patch), "model.in_channels": lambda c: c.in_channels,
          "model.cond_dim": lambda c: c.cond_dim, "model.freq_dim": lambda c: c.freq_dim,
          "model.norm_eps": lambda c: c.norm_eps, "model.rope_theta": lambda c: c.rope_theta}
  conflicts = [f"{k}: config {f(m)}, checkpoint {f(theirs)}" for k, f in keys.items() if f(m) != f(theirs)]
  if conflicts:
    raise CheckpointConfigError(f"{source} does not fit the configured model:\n  " + "\n  ".join(conflicts)
                                + "\nSet these keys to the checkpoint's values (e.g. model.variant=wan2.1-t2v-1.3b).")


# ------------------------------------------------------------------ the tensor map


def _fused(name: str, shape) -> weights.Source:
  """A source tensor [prod(shape)] as our array of `shape` (e.g. a bias [N*Dh] as [N, Dh])."""
  return weights.Source((weights.View(name, (tuple(shape),), tuple(range(len(shape)))),))


def _leading_one(name: str, shape) -> weights.Source:
  """A [1, *shape] tensor (Wan's modulation tables) as [*shape]."""
  split = ((1,),) + tuple((d,) for d in shape)
  return weights.Source((weights.View(name, split, tuple(range(len(split))), (2,) + (1,) * (len(shape) - 1)),))


def _rope_permuted(name: str, width: int, heads: int, kernel: bool) -> weights.Source:
  """Self-attention q/k: Wan's head dim pairs (2i, 2i+1) -> our (i, i + Dh/2)."""
  half = width // heads // 2
  if kernel:  # [N*Dh, D] -> [D, N, Dh]
    return weights.Source((weights.View(name, ((heads, half, 2), (width,)), (3, 0, 2, 1), (1, 1, 2)),))
  return weights.Source((weights.View(name, ((heads, half, 2),), (0, 2, 1), (1, 2)),))  # [N*Dh] -> [N, Dh]


def _block_sources(m: ModelConfig, i: int) -> dict[tuple, weights.Source]:
  _, d, n = dimensions(m)
  f, dh, b = mlp_width(m), d // n, f"blocks.{i}"
  out = {("modulation",): _leading_one(f"{b}.scale_shift_table", (6, d)),
         ("cross_norm", "scale"): weights.tensor(f"{b}.norm2.weight", (d,)),
         ("cross_norm", "bias"): weights.tensor(f"{b}.norm2.bias", (d,)),
         ("fc1", "kernel"): weights.linear(f"{b}.ffn.net.0.proj.weight", (d,), (f,)),
         ("fc1", "bias"): weights.tensor(f"{b}.ffn.net.0.proj.bias", (f,)),
         ("fc2", "kernel"): weights.linear(f"{b}.ffn.net.2.weight", (f,), (d,)),
         ("fc2", "bias"): weights.tensor(f"{b}.ffn.net.2.bias", (d,))}
  for ours, theirs in (("attn", "attn1"), ("cross", "attn2")):
    a = f"{b}.{theirs}"
    for p in "qk":
      rope = ours == "attn"
      out[(ours, p, "kernel")] = (_rope_permuted(f"{a}.to_{p}.weight", d, n, True) if rope
                                  else weights.linear(f"{a}.to_{p}.weight", (d,), (n, dh)))
      out[(ours, p, "bias")] = _rope_permuted(f"{a}.to_{p}.bias", d, n, False) if rope else _fused(f"{a}.to_{p}.bias",
                                                                                                   (n, dh))
      out[(ours, f"norm_{p}", "scale")] = (_rope_permuted(f"{a}.norm_{p}.weight", d, n, False) if rope
                                           else _fused(f"{a}.norm_{p}.weight", (n, dh)))
    out[(ours, "v", "kernel")] = weights.linear(f"{a}.to_v.weight", (d,), (n, dh))
    out[(ours, "v", "bias")] = _fused(f"{a}.to_v.bias", (n, dh))
    out[(ours, "out", "kernel")] = weights.linear(f"{a}.to_out.0.weight", (n, dh), (d,))
    out[(ours, "out", "bias")] = weights.tensor(f"{a}.to_out.0.bias", (d,))
  return out


def sources(m: ModelConfig) -> dict[tuple, weights.Source]:
  """Our parameter path -> its Source in the diffusers layout (every parameter but OURS_ONLY)."""
  depth, d, _ = dimensions(m)
  c, (pt, ph, pw), p = m.in_channels, m.patch, math.prod(m.patch) * m.in_channels
  ce = "condition_embedder"
  layers = [_block_sources(m, i) for i in range(depth)]
  out = {("blocks",) + k: weights.stack([layer[k] for layer in layers]) for k in layers[0]}
  out.update({
      # Conv3d [D, C, pt, ph, pw] -> [pt*ph*pw*C, D], the order of a token's values
      ("patch_embed", "kernel"): weights.Source((weights.View(
          "patch_embedding.weight", ((d,), (c,), (pt,), (ph,), (pw,)), (2, 3, 4, 1, 0), (4, 1)),)),
      ("patch_embed", "bias"): weights.tensor("patch_embedding.bias", (d,)),
      ("time_in", "kernel"): weights.linear(f"{ce}.time_embedder.linear_1.weight", (m.freq_dim,), (d,)),
      ("time_in", "bias"): weights.tensor(f"{ce}.time_embedder.linear_1.bias", (d,)),
      ("time_out", "kernel"): weights.linear(f"{ce}.time_embedder.linear_2.weight", (d,), (d,)),
      ("time_out", "bias"): weights.tensor(f"{ce}.time_embedder.linear_2.bias", (d,)),
      ("time_proj", "kernel"): weights.linear(f"{ce}.time_proj.weight", (d,), (6, d)),
      ("time_proj", "bias"): _fused(f"{ce}.time_proj.bias", (6, d)),
      ("cond_in", "kernel"): weights.linear(f"{ce}.text_embedder.linear_1.weight", (m.cond_dim,), (d,)),
      ("cond_in", "bias"): weights.tensor(f"{ce}.text_embedder.linear_1.bias", (d,)),
      ("cond_out", "kernel"): weights.linear(f"{ce}.text_embedder.linear_2.weight", (d,), (d,)),
      ("cond_out", "bias"): weights.tensor(f"{ce}.text_embedder.linear_2.bias", (d,)),
      ("head_modulation",): _leading_one("scale_shift_table", (2, d)),
      ("head", "kernel"): weights.linear("proj_out.weight", (d,), (p,)),
      ("head", "bias"): weights.tensor("proj_out.bias", (p,)),
  })
  return out


# ------------------------------------------------------------------ reading


def locate(path: str | Path) -> tuple[Path, str]:
  """(directory, "orbax" | "diffusers") of Wan transformer weights, or FileNotFoundError."""
  path = Path(path).absolute()
  if (path / "params").is_dir() and (path / "config").is_dir():
    return path, "orbax"
  if not (path / DIFFUSERS_CONFIG).is_file() and (path / SUBFOLDER / DIFFUSERS_CONFIG).is_file():
    path = path / SUBFOLDER
  if not (path / DIFFUSERS_CONFIG).is_file():
    raise FileNotFoundError(f"{path}: neither a diffusers Wan transformer ({DIFFUSERS_CONFIG} + safetensors, or a "
                            f"model root with {SUBFOLDER}/) nor its Orbax copy (params/ and config/).")
  return path, "diffusers"


def read_config(path: str | Path) -> dict:
  """The diffusers config.json of the weights in `path` (either layout); reads no weights."""
  path, kind = locate(path)
  if kind == "orbax":
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      return ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  d = json.loads((path / DIFFUSERS_CONFIG).read_text())
  if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
    raise ConfigError(f"{path / DIFFUSERS_CONFIG} describes a {d['_class_name']}, not a {CLASS_NAME}.")
  return d


def _zeros(target: jax.ShapeDtypeStruct) -> jax.Array:
  return jax.make_array_from_callback(target.shape, target.sharding, lambda idx: np.zeros(
      [len(range(*s.indices(n))) for s, n in zip(idx, target.shape)], target.dtype))


def load_params(path: str | Path, abstract: nnx.State, m: ModelConfig) -> nnx.State:
  """The weights in `path` as `abstract` (ShapeDtypeStructs carrying shardings): each
  process reads only its devices' blocks. `m` (the model's config) must fit them."""
  path, kind = locate(path)
  check_fits(m, read_config(path), path)
  flat = {p: v.get_value() for p, v in nnx.to_flat_state(abstract)}
  extra = {p: flat.pop(p) for p in OURS_ONLY if p in flat}
  if kind == "orbax":
    target = _nested(flat)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["params"]
    arrays = {p: v for p, v in _flat(restored).items()}
  else:
    with weights.Checkpoint(path, DIFFUSERS_WEIGHTS) as ckpt:
      arrays = weights.load(ckpt, sources(m), flat)
  arrays.update({p: _zeros(t) for p, t in extra.items()})
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, _nested(arrays))
  log.info("loaded the Wan transformer in %s (%s): %d layers, width %d", path, kind, *dimensions(m)[:2])
  return state


def _nested(flat: dict[tuple, object]) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def abstract_dit(m: ModelConfig, mesh=None, rules=None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, parameters as ShapeDtypeStructs with shardings): by the rules on `mesh`,
  else on the first device."""
  return mesh_lib.abstract_module(lambda: DiT(m, rngs=nnx.Rngs(0)), mesh, rules)


def load_pretrained_wan(path: str | Path, *, dtype: str = "float32", mesh=None, rules=None,
                        cfg: ModelConfig | None = None) -> DiT:
  """Our DiT holding the Wan transformer in `path` (a diffusers directory or model root,
  or the Orbax copy), computing in `dtype`; parameters sharded by the rules on `mesh`
  (each process reading only its blocks), else on the first device. `cfg`: the model
  config to build (default: the checkpoint's sizes, umT5 captions)."""
  m = dataclasses.replace(cfg or model_config(read_config(path)), dtype=dtype)
  graphdef, abstract = abstract_dit(m, mesh, rules)
  return nnx.merge(graphdef, load_params(path, abstract, m))


# ------------------------------------------------------------------ writing


def host_params(params: nnx.State) -> dict[tuple, np.ndarray]:
  """Our parameters gathered to this host, by path (single-process use)."""
  return {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(params)}


def save_orbax(params: nnx.State, m: ModelConfig, dst: str | Path, overwrite: bool = False) -> Path:
  """Our Orbax copy of Wan weights: `params` (without OURS_ONLY) and the diffusers `config`."""
  dst = Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it.")
  tree = _nested({p: v.get_value() for p, v in nnx.to_flat_state(params) if p not in OURS_ONLY})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(dst, args=ocp.args.Composite(params=ocp.args.PyTreeSave(tree),
                                            config=ocp.args.JsonSave(diffusers_config(m))), force=overwrite)
  return dst


def export_diffusers(params, m: ModelConfig, dst: str | Path, *, dtype=np.float32,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
  """Write `params` (an nnx.State, or host arrays by path) as a diffusers
  `WanTransformer3DModel` directory: config.json and safetensors shards of at most
  `max_shard_bytes` with their index (one file when it all fits), in `dtype`. Loadable
  by `WanTransformer3DModel.from_pretrained(dst)`."""
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  arrays = params if isinstance(params, dict) else host_params(params)
  arrays = {p: a for p, a in arrays.items() if p not in OURS_ONLY and not lora_lib.is_adapter(p)}
  tensors = {k: v.astype(dtype) for k, v in weights.to_tensors(sources(m), arrays).items()}
  shards, size = [[]], 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += tensors[name].nbytes
  files = [DIFFUSERS_WEIGHTS] if len(shards) == 1 else [
      DIFFUSERS_WEIGHTS.replace(".safetensors", f"-{i + 1:05d}-of-{len(shards):05d}.safetensors")
      for i in range(len(shards))]
  for file, names in zip(files, shards):
    save_file({n: tensors[n] for n in names}, dst / file, metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
    (dst / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
  (dst / DIFFUSERS_CONFIG).write_text(json.dumps(diffusers_config(m), indent=2) + "\n")
  log.info("wrote %d tensors (%.1f MB) in %d file(s) to %s", len(tensors),
           sum(t.nbytes for t in tensors.values()) / 1e6, len(files), dst)
  return dst


# ------------------------------------------------------------------ diffusers-layout forward


def wan_forward(model: DiT, latents, timestep, text) -> jax.Array:
  """The model on diffusers-layout arrays, as `WanTransformer3DModel.forward`: latents
  [B, C, T, H, W], timesteps [B] on the 0-1000 scale (or [B, T'], one per patch frame:
  diffusers' per-token timestep of Wan 2.2 TI2V, constant over a frame), text embeddings
  [B, Lc, Dc] (every slot attended, as Wan's padded embeddings are) -> prediction [B, C, T, H, W]."""
  from src.batch import Packing
  from src.models.patch import patchify, unpatchify

  latents = np.asarray(latents, np.float32)
  b, c, t, h, w = latents.shape
  x = latents.transpose(0, 2, 3, 4, 1)  # [B, T, H, W, C]
  tokens, positions, grid = zip(*(patchify(x[i], model.cfg.patch) for i in range(b)))
  lc = np.shape(text)[1]
  packing = Packing(segment_ids=jnp.ones((b, len(tokens[0])), jnp.int32), positions=jnp.asarray(np.stack(positions)),
                    grid=jnp.asarray(np.array(grid, np.int32)[:, None]), labels=jnp.full((b, 1), -1, jnp.int32),
                    cond=jnp.asarray(text, jnp.float32), cond_segment_ids=jnp.ones((b, lc), jnp.int32))
  time = jnp.asarray(timestep, jnp.float32).reshape(b, 1, -1)  # [B, 1, T'] per frame
  time = time[..., 0] if np.ndim(timestep) == 1 else time
  out = np.asarray(model(jnp.asarray(np.stack(tokens)), time, packing))  # [B, N, P]
  videos = [unpatchify(out[i], grid[i], model.cfg.patch, c) for i in range(b)]
  return jnp.asarray(np.stack(videos).transpose(0, 4, 1, 2, 3))
