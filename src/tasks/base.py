"""The interface every task implements, and what the trainer may ask of it."""

from __future__ import annotations

import abc

import jax
from flax import nnx

from src.config import Config


class Task(abc.ABC):
  """Everything that differs between the things the trainer can train.

  A task owns its model (`build_model`), its frozen parts (`load_frozen`, and as
  shapes `abstract_frozen` for AOT), its host batches (`batches`) and their global
  shapes from the config alone (`batch_shapes`), its training and validation losses,
  how many real and total tokens a batch holds, and what its samples show. The loop,
  the state, checkpoints and metrics are shared (`src.state`, `src.train`).
  """

  def __init__(self, cfg: Config):
    self.cfg = cfg
    self.check()

  scans_layers = False  # whether the model's layers are a lax.scan (its body counted once by XLA's cost analysis)
  trainable = nnx.Param  # the variables the optimizer trains; the rest of the model (a LoRA base) is frozen
  trains_adapters = False  # a LoRA run: `frozen["base"]` holds the rest of the model

  def check(self) -> None:
    """Raise `config.ConfigError` for a config this task cannot run."""

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The trained model, randomly initialised."""

  def pretrained_params(self, abstract: nnx.State) -> nnx.State | None:
    """The weights a fresh run starts from, read into `abstract` (ShapeDtypeStructs
    carrying shardings), or None for a random initialisation. Only a fresh run asks:
    a resume restores its own checkpoint."""
    return None

  def load_frozen(self, mesh, rules) -> dict:
    """What the step uses without training it, loaded now and placed on the mesh: a dict
    of `Frozen` models and arrays (e.g. the VAE, the text encoder); empty if nothing."""
    return {}

  def abstract_frozen(self, mesh, rules) -> dict:
    """`load_frozen` as shapes and shardings only, for an AOT compile."""
    return {}

  @abc.abstractmethod
  def batches(self, split: str = "train", process_index: int = 0, process_count: int = 1):
    """The endless iterator of this host's batches (its rows of the global batch)."""

  @abc.abstractmethod
  def batch_shapes(self, rows: int | None = None):
    """ShapeDtypeStructs of a batch of `rows` rows (default: the global batch)."""

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch, rng: jax.Array, frozen: dict | None = None) -> jax.Array:
    """The training loss of a batch (scalar)."""

  @abc.abstractmethod
  def eval_levels(self) -> dict[str, float]:
    """Validation metric name -> the noise level `eval_loss` is taken at."""

  @abc.abstractmethod
  def eval_loss(self, model: nnx.Module, batch, level: jax.Array, key: jax.Array,
                frozen: dict | None = None) -> jax.Array:
    """The validation loss of a batch at a fixed noise level and fixed noise."""

  def eval_metrics(self, model: nnx.Module, batch, key: jax.Array, frozen: dict | None = None) -> dict:
    """Held-out metrics of a batch in one pass, for a task whose `eval_levels` is empty
    (the VAE: its reconstruction terms)."""
    raise NotImplementedError(f"{type(self).__name__} validates at its eval_levels")

  @abc.abstractmethod
  def count_tokens(self, batch) -> tuple[int, int]:
    """(real, total) tokens of a host batch: what tokens/s and padding count."""

  def with_decoder(self, frozen: dict, mesh) -> dict:
    """The frozen parts samples need: by default the step's own."""
    return frozen

  def sample_quality(self, sampler, videos: list) -> float | None:
    """The fraction of `sampler`'s videos that show what they were asked for, where the
    data make that measurable (`src.quality`: the synthetic clips); else None."""
    return None

  def make_sampler(self, graphdef: nnx.GraphDef, frozen: dict, count: int):
    """A callable (weights, seed) -> list of videos, for periodic samples; None if the
    task makes none."""
    return None
