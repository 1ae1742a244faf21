"""A run directory read back: its config and the weights of its newest checkpoint.

What sampling, export and evaluation start from. Only the weights asked for (EMA or
raw) are read, into the model's abstract layout: no random initialisation, no
optimizer state, no second copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from src import config as config_lib
from src import mesh as mesh_lib
from src import storage
from src.checkpoint import Checkpointer, CheckpointNotFoundError
from src.config import Config
from src.lora import check_fingerprint
from src.state import abstract_model, fingerprint_of
from src.tasks import Task, make_task

log = logging.getLogger(__name__)


def load_run(workdir: str | Path, use_ema: bool = True) -> tuple[Config, nnx.GraphDef, nnx.State]:
  """(cfg, graphdef, params) from the newest checkpoint of a run directory, on the
  devices of this host."""
  cfg, task, graphdef, params = load_task_run(workdir, use_ema)
  return cfg, graphdef, params


def load_task_run(workdir: str | Path, use_ema: bool = True) -> tuple[Config, Task, nnx.GraphDef, nnx.State]:
  """`load_run`, with the run's task object."""
  if not (storage.run_path(workdir) / "checkpoints").is_dir():
    raise CheckpointNotFoundError(f"{workdir} is not a run directory: it has no checkpoints/ (train first)")
  ckpt = Checkpointer(workdir)

  def read(step: int):
    cfg = config_lib.from_dict(ckpt.restore_config(step), f"config of {workdir} step {step}")
    cfg.mesh = config_lib.MeshConfig()  # sample on whatever devices this host has
    task = make_task(cfg)
    graphdef, like = abstract_model(task, mesh_lib.make_mesh(cfg.mesh), mesh_lib.make_rules())
    return step, cfg, task, graphdef, ckpt.restore_part("ema" if use_ema else "params", like, step=step)

  try:
    if ckpt.latest_step() is None:
      raise CheckpointNotFoundError(
          f"no checkpoint in {storage.run_path(workdir) / 'checkpoints'}: train first (python -m src.train ...), "
          "or point --workdir at a run directory")
    step, cfg, task, graphdef, params = ckpt.first_readable(read, None)  # the newest that reads whole
  finally:
    ckpt.close()
  log.info("loaded step %d of %s (%s weights)", step, workdir, "EMA" if use_ema else "raw")
  return cfg, task, graphdef, params


def load_base(workdir: str | Path, task: Task) -> nnx.State:
  """A LoRA run's frozen base on this host's devices, checked against the fingerprint
  its checkpoint saved (the adapters are meaningless on another base)."""
  mesh, rules = mesh_lib.make_mesh(task.cfg.mesh), mesh_lib.make_rules()
  return check_base(workdir, task, task.base(mesh, rules))


def check_base(workdir: str | Path, task: Task, base: nnx.State) -> nnx.State:
  """`base`, once it is checked to be the one the run's adapters were trained on."""
  mesh = mesh_lib.make_mesh(task.cfg.mesh)
  ckpt = Checkpointer(workdir)
  try:
    like = jax.ShapeDtypeStruct((len(jax.tree.leaves(base)), 2), jnp.float32, sharding=mesh_lib.replicated(mesh))
    saved = ckpt.restore_part("base_fingerprint", like)
  finally:
    ckpt.close()
  # Jitted under the mesh, as the trainer takes it: the eager reductions over these sharded arrays aborted the
  # process in XLA:CPU (a second base loaded in one process; not understood, docs/reliability.md).
  with jax.set_mesh(mesh):
    current = jax.jit(fingerprint_of)({"base": base})
  check_fingerprint(saved, current, task.cfg.model.init_from or f"random, seed {task.cfg.seed}")
  return base
