"""Real captions end to end: umT5 ids -> embeddings in the step, in the latent cache
and in the sampler; the empty prompt as the null caption; the config checks. The
encoder itself (parity with transformers, sharded import) is tests/test_umt5.py, the
tokenizer tests/test_tokenizer.py."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import config as C
from src import mesh as M
from src.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
TEXT_LEN = 16


def umt5_config(root, *extra):
  return C.load(None, ["model.variant=tiny", "model.num_classes=0", "model.cond_dim=32", "model.text_encoder=umt5",
                       f"text.checkpoint={root}", f"data.text_len={TEXT_LEN}", "data.batch_size=4",
                       "data.frames=2", "data.height=8", "data.width=8", *extra])


def perturbed(task):
  """The task's model with every weight moved off its (zero) init, so captions reach the output."""
  graphdef, state = nnx.split(task.build_model(nnx.Rngs(0)))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  return nnx.merge(graphdef, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state))


def one_device():
  return M.make_mesh(C.MeshConfig(), jax.devices()[:1]), M.make_rules()


def test_batches_carry_token_ids_that_the_step_encodes(tiny_umt5):
  from src.captions import encode_captions

  task = make_task(umt5_config(tiny_umt5))
  batch = next(task.batches())
  ids = batch.packing.cond
  assert ids.dtype == np.int32 and ids.shape == (4, TEXT_LEN)
  assert (ids[:, 0] >= 0).all() and (ids == -1).any()  # captions, then padding past their end
  frozen = task.load_frozen(*one_device())
  emb = np.asarray(encode_captions(frozen["text"], jnp.asarray(ids), TEXT_LEN))
  assert emb.shape == (4, TEXT_LEN, 32)
  assert np.all(emb[ids == -1] == 0) and np.all(np.abs(emb[ids >= 0]).sum(-1) > 0)  # Wan's zero padding


def test_cached_embeddings_and_the_in_step_encoder_give_the_same_loss(tiny_umt5):
  """What src.encode stores (trimmed, re-padded by the pipeline) trains exactly like the
  encoder in the step."""
  from src.captions import encode_captions
  from src.data.sources import padded_text

  in_step = make_task(umt5_config(tiny_umt5))
  cached = make_task(umt5_config(tiny_umt5, "data.source=latents", "data.data_dir=unused"))
  frozen = in_step.load_frozen(*one_device())
  batch = jax.tree.map(jnp.asarray, next(in_step.batches()))
  ids = batch.packing.cond
  emb = np.asarray(encode_captions(frozen["text"], ids, TEXT_LEN))
  stored = [e[: int((i >= 0).sum())] for e, i in zip(emb, np.asarray(ids))]  # as src.encode writes them
  restored = np.stack([padded_text({"text": t}, TEXT_LEN, 32) for t in stored])
  cached_batch = batch.replace(packing=batch.packing.replace(cond=jnp.asarray(restored)))
  model = perturbed(in_step)
  key = jax.random.key(5)
  a = in_step.loss(model, batch, key, frozen)
  b = cached.loss(model, cached_batch, key, frozen)
  assert float(a) == pytest.approx(float(b), rel=1e-6)
  other = batch.replace(packing=batch.packing.replace(cond=jnp.roll(batch.packing.cond, 1, axis=0)))
  assert abs(float(in_step.loss(model, other, key, frozen)) - float(a)) > 1e-5  # captions matter


def test_a_dropped_caption_is_the_empty_prompt(tiny_umt5):
  """Caption dropout for guidance uses the empty prompt's embedding, as Wan does: every
  caption dropped gives the loss of the same batch captioned with ""."""
  from src.data.sources import caption_ids

  task = make_task(umt5_config(tiny_umt5, "objective.cond_dropout=1.0"))
  keep = make_task(umt5_config(tiny_umt5, "objective.cond_dropout=0.0"))
  frozen = task.load_frozen(*one_device())
  batch = jax.tree.map(jnp.asarray, next(task.batches()))
  empty = np.tile(caption_ids("", TEXT_LEN, str(tiny_umt5 / "tokenizer")), (4, 1))
  as_empty = batch.replace(packing=batch.packing.replace(cond=jnp.asarray(empty)))
  model, key = perturbed(task), jax.random.key(2)
  dropped, empty_prompt, kept = (t.loss(model, b, key, frozen) for t, b in
                                 ((task, batch), (keep, as_empty), (keep, batch)))
  assert float(dropped) == pytest.approx(float(empty_prompt), rel=1e-6)
  assert abs(float(kept) - float(dropped)) > 1e-6  # the captions do reach the model


def test_cond_dim_must_be_the_encoders_width(tiny_umt5):
  with pytest.raises(C.ConfigError, match="model.cond_dim=48.*32 wide"):
    make_task(umt5_config(tiny_umt5, "model.cond_dim=48"))
  with pytest.raises(C.ConfigError, match="text.checkpoint"):
    make_task(umt5_config("", "text.checkpoint="))


def test_the_negative_prompt_steers_the_unconditional_half(tiny_umt5):
  from src.generate import Spec, generate

  cfg = umt5_config(tiny_umt5)
  task = make_task(cfg)
  graphdef, params = nnx.split(perturbed(task))
  frozen = task.sampling_frozen(*one_device())
  specs = [Spec((2, 4, 4), -1, "a red disc moving left")]
  run = lambda **kw: generate(graphdef, params, cfg, specs, steps=3, frozen=frozen, **kw)[0]
  plain, negative = run(guidance=3.0), run(guidance=3.0, negative_prompt="two blue squares moving up")
  assert np.all(np.isfinite(plain)) and np.abs(plain - negative).max() > 1e-4
  np.testing.assert_allclose(run(guidance=1.0), run(guidance=1.0, negative_prompt="anything"), atol=1e-6)


@pytest.mark.slow
def test_encode_writes_caption_embeddings_the_trainer_reads_back(tiny_umt5, tmp_path):
  from src.captions import encode_captions
  from src.data.latents import LatentSource
  from src.data.sources import caption_ids
  from src.encode import main as encode_main
  from src.train import train

  pixels = ["vae.base_dim=8", "vae.z_dim=4", "vae.dim_mult=[1,2,2,2]", "vae.num_res_blocks=1", "vae.enabled=true",
            "data.channels=3", "data.frames=5", "data.height=16", "data.width=16", "model.in_channels=4",
            "model.patch=[1,1,1]", "data.synthetic.num_examples=6"]
  common = ["model.variant=tiny", "model.cond_dim=32", "model.text_encoder=umt5", f"text.checkpoint={tiny_umt5}",
            f"data.text_len={TEXT_LEN}", "data.batch_size=2"]
  assert encode_main(["--out", str(tmp_path / "cache"), *common, *pixels]) == 0
  cache = LatentSource(tmp_path / "cache")
  assert json.loads((tmp_path / "cache" / "metadata.json").read_text())["text_encoder"] == "umt5"
  rec = cache[0]
  ids = caption_ids(rec["caption"], TEXT_LEN, str(tiny_umt5 / "tokenizer"))
  task = make_task(C.load(None, common + pixels))
  want = np.asarray(encode_captions(task.load_frozen(*one_device())["text"], jnp.asarray(ids[None]), TEXT_LEN))[0]
  n = int((ids >= 0).sum())
  assert rec["text"].shape == (n, 32)  # trimmed to the caption's tokens
  np.testing.assert_allclose(rec["text"], want[:n], atol=1e-6)
  run = C.load(None, common + [f"workdir={tmp_path / 'run'}", "data.source=latents", f"data.data_dir={tmp_path / 'cache'}",
                               "data.channels=4", "model.in_channels=4", "model.patch=[1,1,1]", "data.frames=2",
                               "data.height=2", "data.width=2", "train.steps=3", "train.log_every=3", "data.batch_size=8",
                               "train.tensorboard=false"])
  assert np.isfinite(train(run)["loss"])


@pytest.mark.slow
def test_the_umt5_preset_trains_and_samples_end_to_end(tiny_umt5, tmp_path):
  from src.train import train

  cfg = C.load(ROOT / "configs" / "smoke_umt5.yaml", [
      f"workdir={tmp_path}", f"text.checkpoint={tiny_umt5}", "train.steps=20", "train.log_every=10",
      "train.ckpt_every=1000", "train.tensorboard=false", "train.sample_every=20", "train.sample_count=2",
      "train.sample_steps=4", "train.eval_every=20", "train.eval_batches=1"])
  metrics = train(cfg)
  losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and "val/" not in line]
  assert np.isfinite(metrics["loss"]) and losses[-1] < losses[0]
  assert (tmp_path / "samples" / "step_0000020-ema.png").is_file()
  out = tmp_path / "cli" / "u.gif"
  r = subprocess.run([sys.executable, "-m", "src.sample", "--workdir", str(tmp_path), "--label", "1", "--prompt",
                      "a red disc moving left", "--negative-prompt", "two blue squares", "--num", "1", "--steps", "2",
                      "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (out.parent / "u-0.gif").is_file()


def test_a_caption_embedding_of_the_wrong_shape_is_an_error_naming_the_record():
  from src.data.sources import caption_tokens

  rec = {"caption": "a red disc", "name": "clips/a.mp4", "text": np.ones((3, 16), np.float32)}
  np.testing.assert_array_equal(caption_tokens(rec, 4, 16)[:3], rec["text"])  # shorter: zero-padded
  assert not caption_tokens(rec, 4, 16)[3].any()
  for text in (np.ones((4, 8), np.float32), np.ones((6, 16), np.float32)):
    with pytest.raises(ValueError, match=r"clips/a.mp4.*caption embedding of shape"):
      caption_tokens({**rec, "text": text}, 4, 16)
