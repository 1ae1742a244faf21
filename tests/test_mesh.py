"""Mesh construction, the rules table, and placement of host-local batches."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from src import mesh as M
from src.batch import Packing, PackedBatch
from src.config import MeshConfig


def test_minus_one_fills_the_remaining_devices():
  mesh = M.make_mesh(MeshConfig(data=2, fsdp=-1, sequence=1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes", [(3, -1, 1, 1), (2, 2, 1, 1), (2, 2, 2, 2)])
def test_axis_sizes_that_do_not_divide_the_devices_fail_clearly(sizes):
  cfg = MeshConfig(*sizes)
  with pytest.raises(ValueError, match="devices"):
    M.make_mesh(cfg)


def test_rules_map_names_and_use_each_mesh_axis_once():
  rules = M.make_rules({"mlp": ["fsdp", "tensor"]})
  assert M.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")  # fsdp already taken
  assert M.logical_to_spec(("act_batch", "act_seq", "act_embed"), rules) == P(("data", "fsdp"), "sequence", None)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    M.make_rules({"embed": "model"})


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
  x = np.ones((8, 4), np.float32)
  assert M.constrain(x, ("act_batch", "act_embed")) is x
  mesh = M.make_mesh(MeshConfig(data=2, fsdp=2, sequence=1, tensor=2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(M.make_rules()):
    y = jax.jit(lambda a: M.constrain(a * 2, ("act_batch", "act_mlp")))(x)
  assert y.sharding.spec == P(("data", "fsdp"), "tensor")


def local_batch(rows=8):
  """A host batch of `rows` rows: tokens [R, 3, 2] numbered row-major, one example per row."""
  packing = Packing(segment_ids=np.ones((rows, 3), np.int32), positions=np.zeros((rows, 3, 3), np.int32),
                    grid=np.ones((rows, 1, 3), np.int32), labels=np.full((rows, 1), -1, np.int32))
  return PackedBatch(tokens=np.arange(rows * 3 * 2, dtype=np.float32).reshape(rows, 3, 2), packing=packing)


def test_place_batch_assembles_global_rows():
  mesh = M.make_mesh(MeshConfig(data=2, fsdp=-1))
  local = local_batch()
  placed = M.place_batch(mesh, local)
  assert placed.tokens.sharding.spec == P(("data", "fsdp"), None, None)
  assert placed.packing.segment_ids.sharding.spec == P(("data", "fsdp"), None)
  assert len(placed.tokens.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(placed.tokens), local.tokens)
  assert placed.packing.cond is None  # absent fields stay absent
  assert M.batch_devices(mesh) == 8


def test_act_batch_rule_moves_the_batch_placement():
  """mesh.rules={act_batch: data}: the rows split over data only (fsdp replicates
  them), for placed arrays and for the step's input shardings alike."""
  mesh = M.make_mesh(MeshConfig(data=2, fsdp=4))
  local = local_batch()
  rules = M.make_rules({"act_batch": "data"})
  placed = M.place_batch(mesh, local, rules)
  assert placed.tokens.sharding.spec == P("data", None, None)
  assert placed.packing.positions.sharding.spec == P("data", None, None)
  assert M.batch_devices(mesh, rules) == 2
  # Each device holds half the rows: those of its data index, whatever its fsdp index.
  for shard in placed.tokens.addressable_shards:
    assert shard.data.shape == (4, 3, 2)
    np.testing.assert_array_equal(np.asarray(shard.data), local.tokens[shard.index])
  assert {s.index[0].indices(8) for s in placed.tokens.addressable_shards} == {(0, 4, 1), (4, 8, 1)}
  np.testing.assert_array_equal(np.asarray(placed.tokens), local.tokens)
  shardings = M.batch_shardings(mesh, jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), local), rules)
  assert shardings.tokens.spec == P("data", None, None) and shardings.packing.labels.spec == P("data", None)
  # The rules of the enclosing context count too when none are given.
  with nnx.logical_axis_rules(rules):
    assert M.place_batch(mesh, local).tokens.sharding.spec == P("data", None, None)
    assert M.batch_devices(mesh) == 2
  # And the defaults are data x fsdp: 8 ways, one row per device.
  default = M.place_batch(mesh, local)
  assert default.tokens.sharding.spec == P(("data", "fsdp"), None, None)
  assert all(s.data.shape == (1, 3, 2) for s in default.tokens.addressable_shards)
  assert M.batch_devices(mesh) == 8
  # Rows along fsdp only, or replicated.
  assert M.batch_devices(mesh, M.make_rules({"act_batch": "fsdp"})) == 4
  assert M.batch_devices(mesh, M.make_rules({"act_batch": None})) == 1
  assert M.place_batch(mesh, local, M.make_rules({"act_batch": None})).tokens.sharding.spec == P(None, None, None)


@pytest.mark.parametrize("data, fsdp, slices, expect", [
    (-1, 1, 4, (4, 1)), (1, -1, 4, (1, 4)), (2, -1, 4, (2, 2)), (2, 2, 4, (2, 2)), (-1, 1, 1, (1, 1))])
def test_dcn_sizes(data, fsdp, slices, expect):
  assert M.dcn_sizes(MeshConfig(dcn_data=data, dcn_fsdp=fsdp), slices) == expect


@pytest.mark.parametrize("data, fsdp, slices", [(2, 1, 4), (-1, -1, 4), (3, -1, 4), (0, 1, 2)])
def test_dcn_sizes_that_do_not_cover_the_slices(data, fsdp, slices):
  with pytest.raises(ValueError, match="mesh.dcn_data"):
    M.dcn_sizes(MeshConfig(dcn_data=data, dcn_fsdp=fsdp), slices)


def test_gather_for_use_keeps_values_and_gradients_and_shards_the_gradient():
  """FSDP's explicit gather (`mesh.gather_for_use`, used by every Dense) is the identity on values
  and gradients on 8 devices; the gradient comes back split like the parameter, also when the
  split axis is not the first (moved to the front for the reduction)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from src import mesh as mesh_lib
  from src.config import MeshConfig

  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=4, sequence=1, tensor=1), jax.devices()[:8])
  rules = mesh_lib.make_rules({})
  w = jax.random.normal(jax.random.key(0), (16, 24))
  x = jax.random.normal(jax.random.key(1), (8, 16))
  plain = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
  for names in (("embed", "mlp"), ("mlp", "embed")):
    ww = w if names[0] == "embed" else w.T  # stored [24, 16] and used transposed: split on its minor axis
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      spec = mesh_lib.logical_to_spec(names)
      ws = jax.device_put(ww, jax.sharding.NamedSharding(mesh, spec))
      use = (lambda w: w) if names[0] == "embed" else (lambda w: w.T)
      loss = lambda w: jnp.sum(jnp.tanh(x @ use(mesh_lib.gather_for_use(w, names))) ** 2)
      grad = jax.jit(jax.grad(loss))(ws)
    want = plain if names[0] == "embed" else plain.T
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert grad.sharding.spec == spec and "fsdp" in str(spec)
