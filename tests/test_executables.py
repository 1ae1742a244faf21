"""src.executables: a compiled program written to disk and loaded back runs as compiled."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from src import executables


def test_a_saved_executable_loads_and_runs_on_8_devices(tmp_path):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("fsdp")))
  compiled = jax.jit(lambda x, y: {"out": jnp.tanh(x @ x.T) + y}).lower(x, 1.0).compile()
  path = executables.save(compiled, str(tmp_path / "step"), {"topology": "cpu-8"})
  assert executables.read_meta(str(path))["topology"] == "cpu-8"
  loaded = executables.load(str(path))
  np.testing.assert_allclose(loaded(x, 1.0)["out"], compiled(x, 1.0)["out"])


def test_missing_or_foreign_executables_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="step.xla, step.trees.pkl, step.json missing"):
    executables.load(str(tmp_path))
  compiled = jax.jit(lambda x: x + 1).lower(1.0).compile()
  path = executables.save(compiled, str(tmp_path / "old"), {})
  meta = json.loads((path / "step.json").read_text())
  meta["versions"]["jax"] = "0.0.1"
  (path / "step.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="compiled with jax 0.0.1"):
    executables.load(str(path))
