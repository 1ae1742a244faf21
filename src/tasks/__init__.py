"""What the trainer trains: one `Task` object per kind of run.

- `DiTTask`: the spacetime DiT on packed latent tokens (the data are latents, or a
  latent cache written by `src.encode`).
- `PixelDiTTask`: the same DiT on pixel clips that a frozen VAE encodes inside the
  jitted step (`vae.enabled` with a pixel source; fixed-shape clips).
- `VAETask`: the causal video VAE itself, on fixed-shape clips.

`make_task(cfg)` is the one place that reads the config's `task` field; the trainer, `src.aot`,
`src.bench`, `src.sample` and `src.encode` ask the task object instead.
"""

from __future__ import annotations

from src.config import Config
from src.tasks.base import Task
from src.tasks.dit import DiTTask, PixelDiTTask
from src.tasks.vae import VAETask

__all__ = ["Task", "DiTTask", "PixelDiTTask", "VAETask", "make_task"]


def make_task(cfg: Config) -> Task:
  """The task a config asks for, its config checked (ConfigError when it cannot run)."""
  if cfg.task == "vae":
    return VAETask(cfg)
  if cfg.vae.enabled and cfg.data.source != "latents":
    return PixelDiTTask(cfg)
  return DiTTask(cfg)
