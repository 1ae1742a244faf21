"""Compiled programs on disk: `python -m src.aot --save-compiled DIR` writes the train step it
compiled for a TPU topology, so a pod can load it instead of compiling (`load`).

A directory holds `step.xla` (the serialised executable, `jax.experimental.serialize_executable`),
`step.trees.pkl` (the pytree structure of its inputs and outputs) and `step.json` (what it was
compiled for: topology, mesh, jax and libtpu versions, the config). An executable only runs on the
topology, mesh and software it was compiled with; `load` refuses a directory written by another
jax version rather than fail inside the runtime. Paths may be local or gs:// (etils.epath).
"""

from __future__ import annotations

import json
import pickle
from importlib import metadata

import jax
from etils import epath

FILES = ("step.xla", "step.trees.pkl", "step.json")


def versions() -> dict:
  out = {"jax": jax.__version__}
  try:
    out["libtpu"] = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    out["libtpu"] = None
  return out


def save(compiled, directory: str, meta: dict) -> epath.Path:
  """Write `compiled` (a jax Compiled) and `meta` (what it was compiled for) into `directory`."""
  from jax.experimental import serialize_executable

  blob, in_tree, out_tree = serialize_executable.serialize(compiled)
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  (path / "step.xla").write_bytes(blob)
  (path / "step.trees.pkl").write_bytes(pickle.dumps((in_tree, out_tree)))
  (path / "step.json").write_text(json.dumps(dict(meta, versions=versions(), bytes=len(blob)), indent=1))
  return path


def read_meta(directory: str) -> dict:
  path = epath.Path(directory)
  missing = [f for f in FILES if not (path / f).exists()]
  if missing:
    raise FileNotFoundError(f"{directory} is not a saved executable (src.aot --save-compiled): "
                            f"{', '.join(missing)} missing.")
  return json.loads((path / "step.json").read_text())


def load(directory: str, backend=None):
  """The saved executable, loaded onto this process's devices: call it with the inputs it was
  compiled for (the same shapes and shardings)."""
  from jax.experimental import serialize_executable

  meta = read_meta(directory)
  if meta["versions"]["jax"] != jax.__version__:
    raise ValueError(f"{directory} was compiled with jax {meta['versions']['jax']}; this is jax "
                     f"{jax.__version__}: recompile it (src.aot --save-compiled).")
  path = epath.Path(directory)
  in_tree, out_tree = pickle.loads((path / "step.trees.pkl").read_bytes())
  return serialize_executable.deserialize_and_load((path / "step.xla").read_bytes(), in_tree, out_tree,
                                                   backend=backend)
