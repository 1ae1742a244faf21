"""How the TPU compiler lowers a weight gradient's reduce-scatter over an FSDP axis of many chips.

    python -m benchmarks.reduce_scatter --topology v5p-256 [--rows 4096 --cols 4096]

Needs libtpu (the `tpu` extra), not a TPU: it compiles for the topology's devices. On one mesh
axis holding every chip (as `src.mesh.make_mesh` builds `mesh.fsdp`), the weight gradient
x^T dy of tokens split over the chips is reduced to row shards in three forms:
- `auto`: a sharding constraint on the gradient (what the model's FSDP does, `src.mesh`);
- `flat`: an explicit `psum_scatter` over the axis, inside shard_map;
- `torus`: one `psum_scatter` per torus dimension, over the chips that differ only in that
  coordinate (the fastest-varying dimension first; the row blocks are put in the order those
  scatters hand them out, so each chip still ends with its own rows): `src.fsdp`, what the
  model's Dense layers do with `model.gradient_reduce=torus`.
For each form it prints one JSON line: the collectives of the compiled program and the bytes a
chip moves (`src.hlo`, ring costs), over the ideal reduce-scatter ((n - 1) / n of the gradient).
docs/pod.md section 3 records what it found: from 8 v5p chips (a 2x2x2 torus) on, `auto`
compiles to collective-permutes or an all-reduce, and `flat` to an all-reduce of the whole
gradient and a slice, about twice the ideal bytes; `torus` stays three reduce-scatters at the
ideal.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from src import aot, hlo, mesh as mesh_lib
from src.config import MeshConfig
from src.fsdp import device_coords, torus_reduce, torus_steps


def compile_forms(topology: str, rows: int, cols: int, tokens_per_chip: int = 4096) -> list[dict]:
  devices = aot.topology_devices(aot.parse_topology(topology))
  n = len(devices)
  chips = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=-1, sequence=1, tensor=1), devices).devices
  mesh = jax.sharding.Mesh(chips.reshape(-1), ("fsdp",))  # the model's fsdp axis, in its device order
  coords = np.array([device_coords(d) for d in mesh.devices.reshape(-1)])
  found = torus_steps(coords)
  x = jax.ShapeDtypeStruct((tokens_per_chip * n, rows), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
  dy = jax.ShapeDtypeStruct((tokens_per_chip * n, cols), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))

  def manual(reduce):
    return jax.shard_map(lambda a, b: reduce(a.T @ b), mesh=mesh, in_specs=(P("fsdp"), P("fsdp")),
                         out_specs=P("fsdp"))

  forms = {"auto": lambda a, b: jax.lax.with_sharding_constraint(a.T @ b, NamedSharding(mesh, P("fsdp"))),
           "flat": manual(lambda g: jax.lax.psum_scatter(g, "fsdp", scatter_dimension=0, tiled=True))}
  if found:
    forms["torus"] = manual(lambda g: torus_reduce(g, *found))
  ideal = rows * cols * 2 * (n - 1) / n
  out = []
  for name, fn in forms.items():
    compiled = jax.jit(fn).lower(x, dy).compile()
    text = compiled.as_text()
    colls, _ = hlo.collectives(text, n)
    kinds = {k: dict(count=v["count"], bytes=v["ici_bytes"]) for k, v in hlo.summarise(colls).items() if v["count"]}
    moved = sum(v["bytes"] for v in kinds.values())
    out.append(dict(topology=topology, chips=n, form=name, gradient=[rows, cols], collectives=kinds,
                    actual_over_ideal=round(moved / ideal, 3),
                    optimal_seconds=aot.xla_cost(compiled).get("optimal_seconds")))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--topology", default="v5p-256", help="a TPU topology, e.g. v5p-8, v5p-64, v5p-256")
  ap.add_argument("--rows", type=int, default=4096, help="gradient rows (the FSDP-split axis)")
  ap.add_argument("--cols", type=int, default=4096, help="gradient columns")
  args = ap.parse_args(argv)
  try:
    for line in compile_forms(args.topology, args.rows, args.cols):
      print(json.dumps(line), flush=True)
  except aot.AotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
