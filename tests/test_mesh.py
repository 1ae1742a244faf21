"""Mesh construction, the rules table, and placement of host-local batches."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from src import mesh as M
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


def test_place_batch_assembles_global_rows():
  mesh = M.make_mesh(MeshConfig(data=2, fsdp=-1))
  local = {"tokens": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2),
           "segment_ids": np.ones((8, 3), np.int32)}
  placed = M.place_batch(mesh, local)
  assert placed["tokens"].sharding.spec == P(("data", "fsdp"), None, None)
  assert len(placed["tokens"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(placed["tokens"]), local["tokens"])


@pytest.mark.parametrize("data, fsdp, slices, expect", [
    (-1, 1, 4, (4, 1)), (1, -1, 4, (1, 4)), (2, -1, 4, (2, 2)), (2, 2, 4, (2, 2)), (-1, 1, 1, (1, 1))])
def test_dcn_sizes(data, fsdp, slices, expect):
  assert M.dcn_sizes(MeshConfig(dcn_data=data, dcn_fsdp=fsdp), slices) == expect


@pytest.mark.parametrize("data, fsdp, slices", [(2, 1, 4), (-1, -1, 4), (3, -1, 4), (0, 1, 2)])
def test_dcn_sizes_that_do_not_cover_the_slices(data, fsdp, slices):
  with pytest.raises(ValueError, match="mesh.dcn_data"):
    M.dcn_sizes(MeshConfig(dcn_data=data, dcn_fsdp=fsdp), slices)
