"""LoRA: adapters start as the base, a run trains only them (no base-sized optimizer
state, the base unchanged), resumes exactly on the same base only, merges, and its
export loads in diffusers with our outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from src import config as C
from src import convert, lora, wan, wan_lora
from src import mesh as M
from src import optim
from src.lora import LoRAParam
from src.models.dit import DiT
from src.runs import load_base, load_task_run
from src.state import compile_step, init_state, merged
from src.tasks import make_task
from src.train import train

LORA = ["lora.rank=4", "lora.alpha=8", "lora.targets=[attn,cross,ffn,time,text]"]
WAN_TINY = [  # the tiny_wan fixture's sizes (tests/conftest.py TINY_WAN)
    "model.depth=2", "model.width=48", "model.heads=4", "model.mlp_dim=48", "model.freq_dim=32",
    "model.cond_dim=24", "model.in_channels=4", "model.patch=[1,2,2]", "data.frames=2", "data.height=8",
    "data.width=8", "data.channels=4", "data.batch_size=8", "data.text_len=5", "objective.timestep_sampling=uniform",
    "objective.shift=3.0", "optim.lr=3e-3", "optim.warmup_steps=2", "optim.ema_decay=0.5", "train.log_every=2",
    "train.tensorboard=false",
]
STEPS = 12


def _cfg(workdir, root, *extra):
  return C.load(None, WAN_TINY + LORA + [f"workdir={workdir}", f"model.init_from={root}", f"train.steps={STEPS}",
                                         f"train.ckpt_every={STEPS}", *extra])


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(2, 4, 2, 8, 8)).astype(np.float32), np.array([150.0, 700.0], np.float32),
          rng.normal(size=(2, 5, 24)).astype(np.float32))


def test_adapters_start_as_the_base():
  from tests.test_dit import CFG, make_batch

  cfg = C.load(None, LORA)
  model = DiT(CFG, rngs=nnx.Rngs(0), lora=cfg.lora)
  graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
  assert all(p[-1] in ("lora_a", "lora_b") for p, _ in nnx.to_flat_state(adapters))
  assert {p[-2] for p, _ in nnx.to_flat_state(adapters)} >= {"q", "k", "v", "out", "fc1", "fc2", "time_proj", "cond_in"}
  # A non-zero base (a new DiT outputs exactly zero), the adapters as initialised (B = 0).
  base = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), base)
  plain = nnx.merge(nnx.split(DiT(CFG, rngs=nnx.Rngs(0)))[0], base)
  batch = make_batch()
  t = jnp.full((2, 1), 400.0)
  adapted = nnx.merge(graphdef, adapters, base)(batch.tokens, t, batch.packing)
  assert float(jnp.abs(adapted).max()) > 0.1
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain(batch.tokens, t, batch.packing)))


def test_a_lora_run_trains_only_the_adapters(tiny_wan, tmp_path):
  root, _ = tiny_wan
  cfg = _cfg(tmp_path, root)
  task, mesh, rules = make_task(cfg), M.make_mesh(cfg.mesh), M.make_rules()
  optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  frozen = task.load_frozen(mesh, rules)
  before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(frozen["base"])}
  graphdef, state = init_state(task, mesh, rules, optimizer, cfg.seed, frozen)
  leaves = lambda tree: [x for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")]
  adapter_bytes = sum(x.nbytes for x in leaves(state.params))
  biggest_adapter = max(x.size for x in leaves(state.params))
  assert all(lora.is_adapter(p) for p, _ in nnx.to_flat_state(state.params))
  assert max(x.size for x in leaves(state.opt_state)) <= biggest_adapter  # no base-sized tensor
  assert sum(x.nbytes for x in leaves(state.opt_state)) <= 2 * adapter_bytes + 64  # Adam's two moments + counts
  assert sum(x.nbytes for x in before.values()) > 5 * adapter_bytes  # ... of a far larger base (rank 4 here)
  step = compile_step(task, mesh, rules, graphdef, state, optimizer, schedule, frozen)
  data = task.batches()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    for _ in range(3):
      state, metrics = step(state, M.place_batch(mesh, next(data), rules), frozen)
  assert float(metrics["grad_norm"]) > 0
  for p, v in nnx.to_flat_state(frozen["base"]):  # the frozen base: bitwise as it was loaded
    np.testing.assert_array_equal(np.asarray(v.get_value()), before[p], err_msg=str(p))


@pytest.mark.slow
def test_lora_learns_resumes_merges_and_exports(tiny_wan, tmp_path):
  import torch
  from diffusers import WanTransformer3DModel

  root, _ = tiny_wan
  train(_cfg(tmp_path / "a", root))
  losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert np.mean(losses[-2:]) < 0.9 * losses[0], losses
  # Two invocations equal one; the second must run on the same base.
  train(_cfg(tmp_path / "b", root, f"train.run_steps={STEPS // 2}"))
  with pytest.raises(ValueError, match="not the base this run's adapters were trained on"):
    train(_cfg(tmp_path / "b", root, "lora.base_dtype=bfloat16"))
  train(_cfg(tmp_path / "b", root))
  cfg, task, graphdef, a = load_task_run(tmp_path / "a", use_ema=False)
  b = load_task_run(tmp_path / "b", use_ema=False)[3]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert all(lora.is_adapter(p) for p, _ in nnx.to_flat_state(a))

  # Merged equals unmerged.
  base = load_base(tmp_path / "a", task)
  adapted = merged(graphdef, a, {"base": base})
  ours = np.asarray(wan.wan_forward(adapted, *_inputs()))
  plain = wan.load_pretrained_wan(root, cfg=cfg.model)
  folded = wan_lora.merge_lora(plain, wan.host_params(a), lora.scale(cfg.lora))
  np.testing.assert_allclose(np.asarray(wan.wan_forward(folded, *_inputs())), ours, atol=1e-5, rtol=0)

  # The adapter file loads in diffusers on the same base and gives our outputs.
  convert.main(["export", "--workdir", str(tmp_path / "a"), "--lora-only", "--dst", str(tmp_path / "lora.safetensors")])
  theirs = WanTransformer3DModel.from_pretrained(root / "transformer").eval()
  theirs.load_lora_adapter(str(tmp_path / "lora.safetensors"), adapter_name="ft")
  latents, timestep, text = _inputs()
  with torch.no_grad():
    out = theirs(torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text), return_dict=False)[0]
  np.testing.assert_allclose(out.numpy(), ours, atol=1e-4, rtol=0)
  # ... our loader reads it back; merged into the base it is the same model again.
  again = wan_lora.merge_lora(wan.load_pretrained_wan(root, cfg=cfg.model), wan_lora.load_lora(tmp_path / "lora.safetensors",
                                                                                      cfg.model))
  np.testing.assert_allclose(np.asarray(wan.wan_forward(again, *_inputs())), ours, atol=1e-5, rtol=0)
  # --merge: the whole fine-tuned transformer.
  convert.main(["export", "--workdir", str(tmp_path / "a"), "--merge", "--dst", str(tmp_path / "merged")])
  whole = WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
  with torch.no_grad():
    out = whole(torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text), return_dict=False)[0]
  np.testing.assert_allclose(out.numpy(), ours, atol=1e-4, rtol=0)


def test_a_lora_file_with_an_unknown_module_is_named(tiny_wan, tmp_path):
  from safetensors.numpy import save_file

  from src.pretrained import WeightsError

  m = wan.model_config(wan.read_config(tiny_wan[0]))
  save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 48), np.float32),
             "transformer.blocks.0.attn9.to_q.lora_A.weight": np.zeros((4, 48), np.float32)}, tmp_path / "bad.safetensors")
  with pytest.raises(WeightsError, match="blocks.0.attn9.to_q.lora_A.weight' adapts no module"):
    wan_lora.load_lora(tmp_path / "bad.safetensors", m)


def test_lora_config_errors():
  with pytest.raises(C.ConfigError, match="lora.targets"):
    C.load(None, ["lora.rank=4", "lora.targets=[attn(]"])
  with pytest.raises(C.ConfigError, match="lora.rank"):
    C.load(None, ["lora.rank=-1"])


def test_dropout_acts_in_training_only():
  from tests.test_dit import CFG, make_batch

  cfg = C.load(None, LORA + ["lora.dropout=0.5"])
  graphdef, adapters, base = nnx.split(DiT(CFG, rngs=nnx.Rngs(0), lora=cfg.lora), LoRAParam, ...)
  noisy = lambda tree, seed: jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed), x.shape), tree)
  model = nnx.merge(graphdef, noisy(adapters, 2), noisy(base, 1))  # B != 0: the adapters contribute
  batch, t = make_batch(), jnp.full((2, 1), 400.0)
  plain = np.asarray(model(batch.tokens, t, batch.packing))
  dropped = [np.asarray(model(batch.tokens, t, batch.packing, key=jax.random.key(k))) for k in (0, 1)]
  assert np.abs(dropped[0] - plain).max() > 1e-3 and np.abs(dropped[0] - dropped[1]).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(model(batch.tokens, t, batch.packing)), plain)  # no key: no dropout


@pytest.mark.slow
def test_sampling_a_lora_run_checks_its_base(tiny_wan, tmp_path, capsys):
  """`src.sample --workdir` of a LoRA run refuses a base whose weights changed since training."""
  import shutil

  from safetensors.numpy import load_file, save_file

  from src import sample

  root = tmp_path / "wan"
  shutil.copytree(tiny_wan[0], root)
  train(_cfg(tmp_path / "run", root, "train.steps=2", "train.ckpt_every=2"))
  argv = ["--workdir", str(tmp_path / "run"), "--num", "1", "--steps", "2", "--cfg", "1", "--prompt", "x",
          "--out", str(tmp_path / "s.png")]
  assert sample.main(argv) == 0
  for shard in sorted((root / "transformer").glob("*.safetensors")):  # the base on disk is replaced
    save_file({k: v + np.float32(0.01) for k, v in load_file(shard).items()}, shard)
  capsys.readouterr()
  assert sample.main(argv) == 2
  assert "not the base this run's adapters were trained on" in capsys.readouterr().err
