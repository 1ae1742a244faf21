"""Checkpoints: one Orbax CheckpointManager for everything an exact resume needs.

Each step directory under `{workdir}/checkpoints/` holds three items:
- `state`: step, parameters, optimizer state, EMA, RNG key, bad-step count (arrays; every
  host writes its own shards);
- `data`: the grain iterator position, one file per process;
- `config`: the resolved config, so a run directory says how it was made.
Saves are asynchronous and the manager keeps the newest N.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from src import storage
from src.mesh import with_shardings

log = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
  pass


class Checkpointer:
  def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = storage.run_path(workdir) / "checkpoints"  # local or gs://
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None, config: dict, force=False) -> bool:
    args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, like_state: Any, data_iter: grain.DatasetIterator | None = None, step: int | None = None):
    """Restore into the shapes/shardings of `like_state`; the data iterator in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}")
    args = dict(state=ocp.args.StandardRestore(with_shardings(like_state)))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    log.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"]

  def restore_part(self, name: str, like: Any, step: int | None = None):
    """One field of the saved state (e.g. `ema`) into the shapes/shardings of `like`
    (arrays or ShapeDtypeStructs); nothing else of the state is read or allocated."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}")
    target = {name: with_shardings(like)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
    log.info("checkpoint: restored %s of step %d from %s", name, step, self.directory)
    return restored["state"][name]

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}")
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
