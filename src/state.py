"""The train state and the jitted train step, for any task (`src.tasks`).

Everything here takes a task object and a mesh: the task says what model and loss,
this module says how the parameters, optimizer state and EMA are laid out on the mesh
(born sharded, or only as shapes for a restore or an AOT compile) and how one step
updates them. `src.train` runs the loop; `src.aot` and `src.bench` compile the same
step.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from src import lora as lora_lib
from src import mesh as mesh_lib
from src import optim

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  ema: nnx.State
  rng: jax.Array  # raw uint32 key; each step folds in its step number
  bad_steps: jax.Array  # non-finite steps in a row, each skipped (`train_step`)
  # LoRA: the frozen base's `lora.fingerprint` [n, 2] the adapters were trained on
  # (checked at resume); [1, 2] zeros when every parameter is trained (Orbax stores no
  # empty arrays).
  base_fingerprint: jax.Array


@struct.dataclass
class Frozen:
  """A model the step uses but does not train (the VAE encoding pixels in the step, the
  umT5 text encoder): neither optimised nor checkpointed, placed by its task (the VAE
  replicated by `place_frozen`, the text encoder sharded by the rules)."""

  graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  params: nnx.State

  @staticmethod
  def of(model: nnx.Module) -> Frozen:
    return Frozen(*nnx.split(model))

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params)


def place_frozen(frozen: Frozen | None, mesh) -> Frozen | None:
  """Frozen parameters, replicated on every device of the mesh (arrays or shapes)."""
  if frozen is None:
    return None
  sharding = jax.tree.map(lambda _: mesh_lib.replicated(mesh), frozen.params)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen.params)):
    return frozen.replace(params=mesh_lib.with_shardings(frozen.params, sharding))
  return frozen.replace(params=jax.device_put(frozen.params, sharding))


def abstract_model(task, mesh, rules, part: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs carrying their shardings): the model's
  layout without allocating it, e.g. the target of a checkpoint restore. `part` 0 is
  what is trained (`task.trainable`: every parameter, or a LoRA run's adapters), 1 the
  rest (a LoRA run's frozen base)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, *parts = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), task.trainable, ...)
    shardings = nnx.get_named_sharding(parts[part], mesh)
  return graphdef, mesh_lib.with_shardings(parts[part], shardings)


def create_model(task, mesh, rules, seed: int, part: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """Build `part` of the task's model (see `abstract_model`) from `seed`, every parameter
  born sharded: (graphdef, params). The other part is never computed (jit drops it)."""
  graphdef, abstract = abstract_model(task, mesh, rules, part)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    split = lambda key: nnx.split(task.build_model(nnx.Rngs(key)), task.trainable, ...)[1 + part]
    return graphdef, jax.jit(split, out_shardings=shardings)(jax.random.key(seed))


def merged(graphdef: nnx.GraphDef, params: nnx.State, frozen: dict | None) -> nnx.Module:
  """The model of trained `params`, with a LoRA run's frozen base (`frozen["base"]`)."""
  base = (frozen or {}).get("base")
  return nnx.merge(graphdef, params) if base is None else nnx.merge(graphdef, params, base)


def fingerprint_of(frozen: dict | None) -> jax.Array:
  base = (frozen or {}).get("base")
  return lora_lib.fingerprint(base) if base is not None else jnp.zeros((1, 2), jnp.float32)


def init_state(task, mesh, rules, optimizer, seed: int, frozen: dict | None = None) -> tuple[nnx.GraphDef, TrainState]:
  """A fresh state: the task's pretrained weights (`Task.pretrained_params`, read
  straight into their shardings) or a random init, a zero optimizer state, EMA = params;
  with a LoRA base in `frozen`, its fingerprint."""
  graphdef, abstract = abstract_model(task, mesh, rules)
  params = task.pretrained_params(abstract)
  if params is None:
    graphdef, params = create_model(task, mesh, rules, seed)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(optimizer.init, out_shardings=optim.state_shardings(optimizer, params, mesh))(params)
    fp = jax.device_put(jax.jit(fingerprint_of)(frozen), mesh_lib.replicated(mesh))
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, ema=jax.tree.map(jnp.copy, params),
        rng=jax.random.PRNGKey(seed + 1), bad_steps=jnp.zeros((), jnp.int32), base_fingerprint=fp)
  return graphdef, state


def abstract_state(task, mesh, rules, optimizer) -> tuple[nnx.GraphDef, TrainState]:
  """`init_state` as shapes and shardings only: what a resume restores into (nothing
  is initialised first) and what an AOT compile traces with."""
  graphdef, params = abstract_model(task, mesh, rules)
  opt_state = mesh_lib.with_shardings(jax.eval_shape(optimizer.init, params),
                                      optim.state_shardings(optimizer, params, mesh))
  replicated = mesh_lib.replicated(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  bases = len(jax.tree.leaves(abstract_model(task, mesh, rules, part=1)[1])) if task.trains_adapters else 1
  return graphdef, TrainState(step=scalar, params=params, opt_state=opt_state, ema=params,
                              rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated), bad_steps=scalar,
                              base_fingerprint=jax.ShapeDtypeStruct((bases, 2), jnp.float32, sharding=replicated))


def train_step(state: TrainState, batch, frozen: dict | None, *, graphdef, task, optimizer, schedule,
               ema_decay: float, ema_warmup: bool = False):
  rng = jax.random.fold_in(state.rng, state.step)
  loss_fn = lambda params: task.loss(merged(graphdef, params, frozen), batch, rng, frozen)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.update_ema(state.ema, params, optim.ema_decay_at(state.step, ema_decay, ema_warmup))
  # A step whose loss or gradients are not finite changes nothing but the step count and
  # the count of such steps in a row: the state (and so every checkpoint) stays finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  updated = keep((params, opt_state, ema), (state.params, state.opt_state, state.ema))
  bad = jnp.where(finite, 0, state.bad_steps + 1)
  metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), bad_steps=bad)
  return state.replace(step=state.step + 1, params=updated[0], opt_state=updated[1], ema=updated[2],
                       bad_steps=bad), metrics


def jit_step(task, mesh, rules, graphdef, state: TrainState, optimizer, schedule, frozen: dict | None = None):
  """The train step under jit with explicit shardings: the state keeps its own and is
  donated (its buffers become the new state's), the batch is split by the `act_batch`
  rule (its shapes come from the task's config), the frozen parts keep the placement
  the task gave them (a VAE replicated, a text encoder sharded), the metrics are
  replicated."""
  step_fn = functools.partial(train_step, graphdef=graphdef, task=task, optimizer=optimizer, schedule=schedule,
                              ema_decay=task.cfg.optim.ema_decay, ema_warmup=task.cfg.optim.ema_warmup)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_shardings = mesh_lib.batch_shardings(mesh, task.batch_shapes(), rules)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


def compile_step(task, mesh, rules, graphdef, state: TrainState, optimizer, schedule, frozen: dict | None = None):
  """`jit_step` compiled now, from shapes alone (the state's and the config's batch
  shapes): no batch needs to exist yet, and a batch of any other shape is an error,
  never a silent recompile."""
  step = jit_step(task, mesh, rules, graphdef, state, optimizer, schedule, frozen)
  shapes = (mesh_lib.with_shardings(state), task.batch_shapes(), mesh_lib.with_shardings(frozen))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    return step.lower(*shapes).compile()
