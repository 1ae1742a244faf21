"""Training with `workdir=gs://...` end to end, against a local Cloud Storage emulator.

The emulator (gcp-storage-emulator, in the `test` extra) serves the GCS JSON API from
memory on a local port. Every client the trainer uses is pointed at it: gcsfs under
etils.epath (config, metrics, samples) and google-cloud-storage (TensorBoard events)
through STORAGE_EMULATOR_HOST, and TensorStore (Orbax's array writer) through
TENSORSTORE_GCS_HTTP_URL. Nothing leaves the machine.
"""

import gc
import json
import os
import socket

import jax
import numpy as np
import pytest

pytest.importorskip("gcsfs", reason="the `gcs` extra")
emulator = pytest.importorskip("gcp_storage_emulator.server", reason="the `test` extra")

from etils import epath  # noqa: E402

from src import config as C  # noqa: E402
from src import storage  # noqa: E402

RUN = "gs://bucket/run"
TINY = [
    "model.variant=tiny", "model.num_classes=10", "model.cond_dim=0", "model.patch=[1,2,2]",
    "data.frames=2", "data.height=8", "data.width=8", "data.channels=4", "data.batch_size=8",
    "optim.warmup_steps=1", "train.log_every=1", "train.ckpt_every=2", "train.eval_every=0",
    "train.sample_every=4", "train.sample_count=1", "train.sample_steps=2", "train.tensorboard=true",
    f"workdir={RUN}",
]


def _report_generations() -> None:
  """Media downloads of the emulator omit the `x-goog-generation` header that real GCS
  sends and TensorStore reads (OCDBT re-reads its manifest under a conditional write):
  add it to the emulator's download routes."""
  from gcp_storage_emulator.handlers import objects

  original = getattr(objects.download, "original", objects.download)

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - a missing object: the 404 is already set
      return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]

  download.original = original
  objects.download = download  # `objects.get` (JSON API, alt=media) calls it by this name
  for _, methods in emulator.HANDLERS:
    for method, handler in methods.items():
      if getattr(handler, "original", handler) is original:
        methods[method] = download


@pytest.fixture
def fake_gcs(monkeypatch):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  url = f"http://localhost:{port}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
  _report_generations()
  server = emulator.create_server("localhost", port, in_memory=True, default_bucket="bucket")
  server.start()
  import gcsfs

  gcsfs.GCSFileSystem.clear_instance_cache()  # no client made before the endpoint was set
  try:
    yield
  finally:
    # tensorboardX's GCS record writers outlive the closed SummaryWriter (its logger
    # thread keeps them) and upload their file once more when collected, at exit, after
    # the server is gone: flush them now and make that last upload a no-op.
    from tensorboardX.record_writer import GCSRecordWriter

    for obj in gc.get_objects():
      if type(obj) is GCSRecordWriter:  # not isinstance: that probes every object, lazy modules too
        obj.close()
        obj.close = lambda: None
    server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.slow
def test_train_resume_and_sample_on_gcs(fake_gcs):
  from src.runs import load_run
  from src.train import train

  train(C.load(None, TINY + ["train.steps=4"]))
  run = epath.Path(RUN)
  assert "model:" in (run / "config.yaml").read_text()
  assert (run / "samples" / "step_0000004-ema.png").exists()
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())

  last = train(C.load(None, TINY + ["train.steps=6"]))  # a second session resumes from step 4
  assert np.isfinite(last["loss"])
  steps = [r["step"] for r in storage.read_metrics(RUN) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in run.glob("metrics-*.jsonl")) == ["metrics-000000000.jsonl", "metrics-000000004.jsonl"]
  assert json.loads((run / "metrics-000000004.jsonl").read_text().splitlines()[0])["step"] == 5

  cfg, _, params = load_run(RUN)
  assert cfg.train.steps == 6 and all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
  assert not os.path.exists("gs:")  # nothing went to a local directory named after the URL
