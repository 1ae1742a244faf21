"""Tests for real data: clip decoding (src/data/video.py), the folder builder
(src/data/build.py), the folder / tfds / mixture sources and the pipeline on them.

Every test video is encoded here with PyAV: tiny (16-48 px), a few frames, at several
sizes, durations and frame rates, next to images and deliberately broken files.
"""

import collections
import io
import json

import jax
import numpy as np
import pytest

av = pytest.importorskip("av")  # the project's `video` extra
from PIL import Image  # noqa: E402

from src import config as config_lib  # noqa: E402
from src.config import DataConfig  # noqa: E402
from src.data import build as build_lib  # noqa: E402
from src.data.pipeline import host_stream, make_iterator  # noqa: E402
from src.data.sizes import fit_area  # noqa: E402
from src.data.sources import clip_source, folder_source, make_source  # noqa: E402
from src.data.video import ClipDecoder, ClipShape, pick_frames, to_unit_range  # noqa: E402
from src.models.patch import unpack  # noqa: E402

PATCH = (1, 2, 2)
GOOD = {  # file -> (format, codec, frames, height, width, fps); images: None
    "a.mp4": ("mp4", "libx264", 10, 24, 32, 12),
    "portrait.mp4": ("mp4", "libx264", 16, 32, 24, 24),
    "square.mp4": ("mp4", "libx264", 12, 48, 48, 25),
    "wide.webm": ("webm", "libvpx-vp9", 7, 16, 48, 8),
    "b.webm": ("webm", "libvpx-vp9", 9, 24, 40, 15),
    "loop.gif": ("gif", "gif", 5, 20, 20, 10),
    "photo.png": None,
    "photo.jpg": None,
    "alpha.png": None,  # RGBA: the alpha channel is dropped
}
BAD = {  # file -> the skip reason it must be counted under
    "truncated.mp4": "undecodable",
    "noise.webm": "undecodable",
    "empty.mp4": "empty",
    "grey.png": "channels",
    "short.mp4": "too_short",  # 2 frames at 30 fps: under 2 frames at 8 fps
    "uncaptioned.mp4": "no_caption",  # no row in the captions file
    "blank.mp4": "no_caption",  # a row with an empty caption
}


def write_video(path, fmt, codec, frames, height, width, fps, level=lambda i: 40 + 8 * i):
  """A clip whose frame i is filled with grey `level(i)`, with a red left quarter."""
  pix = "rgb8" if codec == "gif" else "yuv420p"
  with av.open(str(path), "w", format=fmt) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, pix
    if not frames:
      container.start_encoding()
    for i in range(frames):
      image = np.full((height, width, 3), level(i), np.uint8)
      image[:, : width // 4] = (220, 20, 20)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_folder(root, good=GOOD, bad=BAD):
  """Media files and a JSONL captions file; labels are 100 + the file's position."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for name, spec in good.items():
    if spec:
      write_video(root / name, *spec)
    else:
      mode, shape = ("RGBA", (28, 36, 4)) if name == "alpha.png" else ("RGB", (20, 30, 3))
      Image.fromarray(rng.integers(0, 255, shape, np.uint8), mode).save(root / name)
  makers = {
      "truncated.mp4": lambda p: p.write_bytes((root / "a.mp4").read_bytes()[:900]),
      "noise.webm": lambda p: p.write_bytes(rng.bytes(2000)),
      "empty.mp4": lambda p: write_video(p, "mp4", "libx264", 0, 16, 16, 8),
      "grey.png": lambda p: Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8), "L").save(p),
      "short.mp4": lambda p: write_video(p, "mp4", "libx264", 2, 16, 16, 30),
      "uncaptioned.mp4": lambda p: write_video(p, "mp4", "libx264", 6, 16, 16, 8),
      "blank.mp4": lambda p: write_video(p, "mp4", "libx264", 6, 16, 16, 8),
  }
  for name in bad:
    makers[name](root / name)
  names = sorted(set(good) | set(bad))
  rows = [{"file": n, "caption": "" if n == "blank.mp4" else f"clip {n.replace('.', ' ')}", "label": 100 + i}
          for i, n in enumerate(names) if n != "uncaptioned.mp4"]
  (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  return {n: 100 + i for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """The built dataset of GOOD + BAD files: (data_dir, file -> label)."""
  root = tmp_path_factory.mktemp("videos")
  labels = write_folder(root / "src")
  out = root / "data"
  assert build_lib.main(["--src", str(root / "src"), "--captions", str(root / "src" / "captions.jsonl"),
                         "--out", str(out), "--no-probe"]) == 0  # bad files kept: the pipeline's skips are tested
  return out, labels


def _cfg(data_dir, **kw):
  base = dict(source="folder", data_dir=str(data_dir), channels=3, batch_size=4, area=64, seq_len=96,
              max_segments=6, frame_counts=[2, 4], fps=8.0, text_len=4, prefetch=1, probe_records=8)
  return DataConfig(**{**base, **kw})


def _names(stream, count):
  return [bytes(stream[i]["filename"]).decode() for i in range(count)]


def _assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert jax.tree.structure(x) == jax.tree.structure(y)  # the same fields present
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y)):
      np.testing.assert_array_equal(u, v, err_msg=jax.tree_util.keystr(path))


# Decoding.


def test_frames_are_sampled_at_the_target_rate(tmp_path):
  path = tmp_path / "ramp.mp4"
  write_video(path, "mp4", "libx264", 24, 32, 32, 24, level=lambda i: 20 + 8 * i)
  decoder = ClipDecoder(ClipShape((4,), (16, 16), 0, (1.0, 1.0), 2), fps=8.0, flip=False, require_caption=False)
  for seed in range(3):
    clip = decoder({"video": path.read_bytes(), "label": 3}, np.random.default_rng(seed))["video"]
    assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.float32
    assert -1 <= clip.min() and clip.max() <= 1
    grey = (clip[:, :, -4:].mean(axis=(1, 2, 3)) + 1) * 127.5  # right of the red quarter
    np.testing.assert_allclose(np.diff(grey), 24, atol=3)  # 24 fps -> 8 fps: every 3rd frame
    assert np.all(clip[:, :, :2, 0] > 0.5) and np.all(clip[:, :, :2, 1] < -0.5)  # red stays left


def test_pick_frames_stride_lengths_and_limits():
  rng = np.random.default_rng(0)
  idx = pick_frames(100, 30.0, 10.0, 2, (4,), rng)  # 30 -> 10 fps, then every 2nd: step 6
  np.testing.assert_array_equal(np.diff(idx), 6)
  assert idx[0] >= 0 and idx[-1] < 100
  assert len(pick_frames(10, 10.0, 0.0, 1, (4, 8, 16), rng)) in (4, 8)  # 16 does not fit
  np.testing.assert_array_equal(pick_frames(1, 10.0, 0.0, 1, (4,), rng), [0])  # a still image


def test_an_overstated_frame_count_costs_a_second_pass_not_the_clip(tmp_path, monkeypatch):
  """webm states no frame count; when the one found is too high (as mp4 edit lists can
  make it), the clip is drawn again from the frames the stream really has."""
  import src.data.video as video

  write_video(tmp_path / "v.webm", "webm", "libvpx-vp9", 6, 16, 16, 8)
  monkeypatch.setattr(video, "_count_frames", lambda data: 60)
  decoder = ClipDecoder(ClipShape((4,), (8, 8), 0, (1.0, 1.0), 2), require_caption=False)
  for seed in range(4):  # most starts in 0..56 lie past the real end
    out = decoder({"video": (tmp_path / "v.webm").read_bytes()}, np.random.default_rng(seed))
    assert out["video"].shape == (4, 8, 8, 3)


def test_images_keep_aspect_under_the_area_budget_and_flip():
  image = np.zeros((24, 48, 3), np.uint8)
  image[:, :12] = 255  # white left quarter
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "PNG")
  shape = ClipShape((2,), None, 64, (9 / 16, 16 / 9), 2)
  decoder = ClipDecoder(shape, require_caption=False, frame_multiple=1)
  clips = [decoder({"image": buf.getvalue()}, np.random.default_rng(s))["video"] for s in range(8)]
  assert {c.shape for c in clips} == {(1, *fit_area(16 / 9, 64, 2), 3)}  # aspect 2 clamped to 16/9
  left = {bool(c[0, :, 0].mean() > 0) for c in clips}
  assert left == {True, False}  # flipped for some seeds, not others
  flipped = next(c for c in clips if c[0, :, 0].mean() < 0)
  np.testing.assert_array_equal(flipped[:, :, ::-1], next(c for c in clips if c[0, :, 0].mean() > 0))
  still = ClipDecoder(shape, require_caption=False, frame_multiple=2)  # temporal patch 2: a still clip
  assert still({"image": buf.getvalue()}, np.random.default_rng(0))["video"].shape[0] == 2


def test_uint8_arrays_are_clips_and_bad_shapes_are_skipped():
  decoder = ClipDecoder(ClipShape((2,), (8, 8), 0, (1.0, 1.0), 2), stride=2, require_caption=False)
  rng = np.random.default_rng(0)
  assert decoder({"video": np.zeros((6, 10, 12, 3), np.uint8)}, rng)["video"].shape == (2, 8, 8, 3)
  assert decoder({"video": np.zeros((6, 10, 12, 1), np.uint8)}, rng)["skip"] == "channels"
  assert decoder({"video": np.zeros((1, 10, 12, 3), np.uint8)}, rng)["video"].shape == (1, 8, 8, 3)
  assert decoder({"video": np.zeros((2, 10, 12, 3), np.uint8)}, rng)["skip"] == "too_short"  # step 2
  assert decoder({"label": 1}, rng)["skip"] == "empty"
  synthetic = {"video": np.zeros((2, 8, 8, 3), np.float32), "label": 0, "caption": "x"}
  assert decoder(synthetic, rng) is synthetic


def test_uint8_transport_decodes_to_the_same_clip(folder):
  """Workers ship uint8 pixels; `to_unit_range` afterwards gives the float clip exactly."""
  data_dir, _ = folder
  records = folder_source(str(data_dir), "train")
  floats, uint8s = (ClipDecoder.from_config(_cfg(data_dir), 2, uint8=u) for u in (False, True))
  checked = 0
  for i in range(len(records)):
    a, b = (decode(records[i], np.random.default_rng(i)) for decode in (floats, uint8s))
    if "video" in a:
      assert a["video"].dtype == np.float32 and b["video"].dtype == np.uint8
      np.testing.assert_array_equal(to_unit_range(b["video"]), a["video"])
      checked += 1
  assert checked == len(GOOD)


# The builder.


def test_captions_from_csv_and_jsonl(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("x.png", "y.png", "z.png"):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / name)
  (src / "c.csv").write_text('file,caption,label\nx.png,"a, quoted caption",3\ny.png,plain,\ngone.mp4,lost,1\n')
  rows = [{"file": "x.png", "caption": "a, quoted caption", "label": 3}, {"file": "y.png", "caption": "plain"}]
  (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  csv, jsonl = build_lib.read_captions(src / "c.csv"), build_lib.read_captions(src / "c.jsonl")
  assert csv["x.png"] == jsonl["x.png"] == {"caption": "a, quoted caption", "label": 3}
  assert csv["y.png"] == jsonl["y.png"] == {"caption": "plain", "label": -1}
  entries = dict(build_lib.list_entries(src, csv))
  assert set(entries) == {"x.png", "y.png", "z.png"}  # gone.mp4 dropped, z.png kept uncaptioned
  assert entries["z.png"]["caption"] == ""
  build_lib.build(str(src), str(src / "c.csv"), str(tmp_path / "out"), val_count=1)
  train, val = folder_source(str(tmp_path / "out"), "train"), folder_source(str(tmp_path / "out"), "validation")
  assert len(train) == 2 and len(val) == 1
  assert set(_names(train, 2) + _names(val, 1)) == {"x.png", "y.png", "z.png"}


def test_the_build_leaves_out_unreadable_files_and_reports_each_split(tmp_path, capsys):
  write_folder(tmp_path / "src")
  assert build_lib.main(["--src", str(tmp_path / "src"), "--captions", str(tmp_path / "src" / "captions.jsonl"),
                         "--out", str(tmp_path / "out"), "--val_count", "3"]) == 0
  unreadable = {n: r for n, r in BAD.items() if r in ("undecodable", "empty", "channels")}
  report = json.loads(next((tmp_path / "out").rglob(build_lib.REPORT)).read_text())
  assert {n: why["reason"] for n, why in report["skipped"].items()} == unreadable
  train, val = folder_source(str(tmp_path / "out"), "train"), folder_source(str(tmp_path / "out"), "validation")
  kept = set(_names(train, len(train)) + _names(val, len(val)))
  assert kept == set(GOOD) | set(BAD) - set(unreadable) and len(val) == report["validation"]["files"] == 3
  assert report["train"]["files"] + 3 == len(kept)
  images = sum(spec is None for spec in GOOD.values())
  assert report["train"]["images"] + report["validation"]["images"] == images
  assert report["train"]["videos"] + report["validation"]["videos"] == len(kept) - images
  assert sorted(report["train"]["uncaptioned"] + report["validation"]["uncaptioned"]) == ["blank.mp4", "uncaptioned.mp4"]
  out = capsys.readouterr()
  assert "Downloading and preparing" not in out.out + out.err  # tfds' noise is not the report
  assert "left out 4 unreadable file(s): channels 1 (grey.png); empty 1 (empty.mp4)" in out.err  # the CLI logs
  assert f"train: {report['train']['files']} files" in out.err and "validation: 3 files" in out.err
  build_lib.main(["--src", str(tmp_path / "src"), "--captions", str(tmp_path / "src" / "captions.jsonl"),
                  "--out", str(tmp_path / "out")])  # reused as built: the report is the build's
  err = capsys.readouterr().err
  assert "is reused as it is" in err and "left out 4 unreadable" in err


def test_missing_paths_and_misconfigurations_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="video folder not found"):
    build_lib.list_entries(tmp_path / "nope", {})
  with pytest.raises(FileNotFoundError, match="captions file not found"):
    build_lib.read_captions(tmp_path / "nope.csv")
  assert build_lib.main(["--src", str(tmp_path / "nope"), "--captions", "x.csv", "--out", str(tmp_path)]) == 1
  with pytest.raises(SystemExit):
    build_lib.main(["--help"])
  with pytest.raises(FileNotFoundError, match="python -m src.data.build"):
    make_source(_cfg(tmp_path / "not_built"), seed=0)
  with pytest.raises(ValueError, match="needs data.data_dir"):
    make_source(_cfg(""), seed=0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_source(_cfg(tmp_path / "nope", source="tfds:mnist"), seed=0)
  with pytest.raises(ValueError, match="cannot open tfds dataset 'no_such_set'"):
    make_source(_cfg(tmp_path, source="tfds:no_such_set"), seed=0)
  with pytest.raises(FileNotFoundError, match="python -m src.encode"):
    make_source(_cfg(tmp_path, source="latents"), seed=0)
  with pytest.raises(ValueError, match="set data.channels=3"):
    make_source(_cfg(tmp_path, channels=4), seed=0)


# The pipeline on the folder dataset.


def test_folder_batches_hold_every_good_file_and_count_the_bad(folder):
  data_dir, labels = folder
  cfg = _cfg(data_dir)
  records = len(folder_source(str(data_dir), "train"))
  assert records == len(GOOD) + len(BAD)
  it = make_iterator(cfg, PATCH, cond_dim=4, seed=0)
  seen = collections.Counter()
  for _ in range(40):  # past one epoch and until every good file came out
    for ex in unpack(next(it)):
      seen[ex["label"]] += 1
      assert tuple(ex["grid"])[0] in (1, 2, 4) and np.abs(ex["tokens"]).max() <= 1
      assert ex["tokens"].dtype == np.float32  # pixels in [-1, 1], from uint8 k as k / 127.5 - 1
      np.testing.assert_allclose(ex["tokens"], np.round((ex["tokens"] + 1) * 127.5) / 127.5 - 1, atol=1e-6)
    if it.get_state()["next_index"] >= records and {labels[n] for n in GOOD} <= set(seen):
      break
  assert set(seen) == {labels[n] for n in GOOD}  # every good file, no bad one
  # The counts are exact: the skipped records among the stream positions consumed.
  stream = host_stream(cfg, seed=0, spatial_multiple=2)
  consumed = _names(stream, it.get_state()["next_index"])
  assert it.skip_counts() == dict(collections.Counter(BAD[n] for n in consumed if n in BAD))
  assert set(it.skip_counts()) == set(BAD.values())


def test_host_shards_are_disjoint_and_cover_the_folder(folder):
  data_dir, labels = folder
  cfg = _cfg(data_dir, batch_size=4)
  records = len(folder_source(str(data_dir), "train"))
  shards = [_names(host_stream(cfg, 0, 2, "train", host, 2), (records + 1 - host) // 2) for host in range(2)]
  assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(labels)
  assert all(len(set(s)) == len(s) for s in shards)  # one epoch of a shard: no repeats
  it = make_iterator(cfg, PATCH, cond_dim=0, seed=0, process_index=1, process_count=2)
  got = {ex["label"] for _ in range(6) for ex in unpack(next(it))}
  assert got <= {labels[n] for n in shards[1]}


@pytest.mark.slow
def test_resume_is_exact_with_worker_processes(folder):
  data_dir, _ = folder
  cfg = _cfg(data_dir, num_workers=2, pack_max_wait=2)
  it = make_iterator(cfg, PATCH, cond_dim=3, seed=0)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert state["pending"] and state["skipped"], "the test needs waiting examples and skipped records"
  expected = [next(it) for _ in range(3)]
  fresh = make_iterator(cfg, PATCH, cond_dim=3, seed=0)
  fresh.set_state(state)
  assert fresh.skip_counts() == state["skipped"]
  _assert_batches_equal(expected, [next(fresh) for _ in range(3)])
  assert fresh.skip_counts() == it.skip_counts()
  it.close()
  fresh.close()


def test_nothing_usable_fails_at_start_up(tmp_path):
  bad = {n: BAD[n] for n in ("noise.webm", "grey.png", "empty.mp4")}
  write_folder(tmp_path / "src", good={}, bad=bad)
  every_reason = r"channels 1 \(grey.png\); empty 1 \(empty.mp4\); undecodable 1 \(noise.webm\)"
  with pytest.raises(ValueError, match=r"none of the 3 media files .* can be read: " + every_reason):
    build_lib.build(str(tmp_path / "src"), str(tmp_path / "src" / "captions.jsonl"), str(tmp_path / "out"))
  build_lib.build(str(tmp_path / "src"), str(tmp_path / "src" / "captions.jsonl"), str(tmp_path / "out"), probe=False)
  with pytest.raises(ValueError, match=r"none of the first 8 records is usable .*'undecodable'"):
    make_iterator(_cfg(tmp_path / "out"), PATCH, cond_dim=0, seed=0)
  mixed = _cfg("", source="mixture", mixture=[{"source": "synthetic"},
                                             {"source": "folder", "data_dir": str(tmp_path / "out")}])
  with pytest.raises(ValueError, match="data.source=folder: none of the first 8"):  # a good part hides nothing
    make_iterator(mixed, PATCH, cond_dim=0, seed=0)


def test_tfds_name_and_mixture_with_synthetic(folder):
  data_dir, labels = folder
  via_tfds, via_folder = (clip_source(_cfg(data_dir, source=s), 0, 2) for s in ("tfds:folder_videos", "folder"))
  assert len(via_tfds) == len(via_folder) == len(labels)
  for i in range(len(labels)):
    a, b = via_tfds[i], via_folder[i]
    assert a.keys() == b.keys() and a.get("skip") == b.get("skip")
    if "video" in a:
      np.testing.assert_array_equal(a["video"], b["video"])
  mixed = _cfg("", source="mixture", mixture=[{"source": "synthetic", "weight": 3.0},
                                             {"source": "folder", "weight": 1.0, "data_dir": str(data_dir)}])
  it = make_iterator(mixed, PATCH, cond_dim=0, seed=0)
  got = [ex["label"] for _ in range(8) for ex in unpack(next(it))]
  real = sum(label >= 100 for label in got)
  assert 0 < real < len(got) / 2  # about 1 in 4 from the folder
  with pytest.raises(ValueError, match="needs a 'source'"):
    make_source(_cfg("", source="mixture", mixture=[{"weight": 1.0}]), seed=0)


@pytest.mark.slow
def test_train_three_steps_on_the_folder(folder, tmp_path):
  from src.train import train

  data_dir, _ = folder
  overrides = [
      f"workdir={tmp_path / 'run'}", "model.variant=tiny", "model.in_channels=3", "data.channels=3",
      "data.source=folder", f"data.data_dir={data_dir}", "data.frames=2", "data.height=8", "data.width=8",
      "data.fps=8", "data.batch_size=8", "data.prefetch=1", "train.steps=3", "train.log_every=1",
      "train.tensorboard=false", "train.async_checkpoint=false", "optim.warmup_steps=1",
  ]
  metrics = train(config_lib.load(None, overrides))
  assert np.isfinite(metrics["loss"])


def test_clip_batches_from_uint8_and_float_sources(folder):
  """Fixed-shape clip batches (VAE training): a folder's rows cross as uint8 and arrive
  as float32 in [-1, 1], images as still clips, bad files counted; a batch mixing
  them with synthetic float clips is float too; resume is exact."""
  from src.data.clips import _stack, make_clip_iterator

  data_dir, labels = folder
  still = clip_source(_cfg(data_dir, area=0, frames=3, height=8, width=8), 0, 2, frame_multiple=3)
  records = folder_source(str(data_dir), "train")
  images = [still[i]["video"] for i in range(len(still))
            if bytes(records[i]["filename"]).decode() in ("photo.png", "photo.jpg", "alpha.png")]
  assert len(images) == 3 and all(v.shape == (3, 8, 8, 3) and (v == v[:1]).all() for v in images)

  fixed = dict(area=0, frames=2, height=8, width=8, seq_len=0, frame_counts=[], batch_size=2, text_len=4)
  it = make_clip_iterator(_cfg(data_dir, **fixed), cond_dim=3, seed=0, spatial_multiple=2)
  seen = collections.Counter()
  for _ in range(5):  # 10 clips: past the folder's 9 good files (3 images), its whole first epoch
    batch = next(it)
    assert batch.video.shape == (2, 2, 8, 8, 3) and batch.video.dtype == np.float32
    assert np.abs(batch.video).max() <= 1 and batch.cond.shape == (2, 4, 3)
    assert batch.labels.shape == (2, 1) and batch.labels.dtype == np.int32
    np.testing.assert_array_equal(batch.cond_segment_ids, np.ones((2, 4), np.int32))
    seen.update(batch.labels[:, 0].tolist())
  assert set(seen) == {labels[n] for n in GOOD}
  # Counted exactly: the bad files among the stream positions consumed.
  consumed = _names(host_stream(_cfg(data_dir, **fixed), seed=0, spatial_multiple=2), it.get_state()["next_index"])
  counts = it.skip_counts()
  assert counts == dict(collections.Counter(BAD[n] for n in consumed if n in BAD))
  assert set(counts) == set(BAD.values())

  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = make_clip_iterator(_cfg(data_dir, **fixed), cond_dim=3, seed=0, spatial_multiple=2)
  fresh.set_state(state)
  assert fresh.skip_counts() == counts
  _assert_batches_equal(expected, [next(fresh) for _ in range(3)])

  mixture = [{"source": "synthetic"}, {"source": "folder", "data_dir": str(data_dir)}]
  it = make_clip_iterator(_cfg("", source="mixture", mixture=mixture, **fixed), cond_dim=0, seed=0, spatial_multiple=2)
  for _ in range(6):
    batch = next(it)
    assert batch.cond is None and batch.cond_segment_ids is None  # cond_dim=0: no caption tokens
    video = batch.video
    assert video.shape == (2, 2, 8, 8, 3) and video.dtype == np.float32 and np.abs(video).max() <= 1
  u8 = {"video": np.full((1, 2, 2, 3), 255, np.uint8), "labels": np.ones(1, np.int32)}
  f32 = {"video": np.full((1, 2, 2, 3), -0.5, np.float32), "labels": np.zeros(1, np.int32)}
  assert _stack([u8, u8]).video.dtype == np.float32 and _stack([u8, u8]).video.min() == 1.0
  mixed = _stack([u8, f32])
  assert mixed.video.dtype == np.float32 and mixed.video[0].min() == 1.0 and mixed.video[1].max() == -0.5
  assert mixed.labels.tolist() == [[1], [0]]


def test_clip_batches_fail_at_start_up_when_nothing_is_usable(tmp_path):
  bad = {n: BAD[n] for n in ("noise.webm", "grey.png", "empty.mp4")}
  write_folder(tmp_path / "src", good={}, bad=bad)
  build_lib.build(str(tmp_path / "src"), str(tmp_path / "src" / "captions.jsonl"), str(tmp_path / "out"), probe=False)
  from src.data.clips import make_clip_iterator

  fixed = dict(area=0, frames=2, height=8, width=8, seq_len=0, frame_counts=[])
  with pytest.raises(ValueError, match=r"none of the first 8 records is usable"):
    make_clip_iterator(_cfg(tmp_path / "out", **fixed), cond_dim=0, seed=0, spatial_multiple=2)


def test_bad_captions_rows_are_named_and_skipped_or_strict(tmp_path, caplog):
  path = tmp_path / "c.csv"
  path.write_text('file,caption,label\nx.png,fine,1\ny.png,"bad label",two\nz.png,also fine,\n')
  caplog.set_level("WARNING")
  skipped = []
  rows = build_lib.read_captions(path, skipped=skipped)
  assert set(rows) == {"x.png", "z.png"} and len(skipped) == 1
  assert f"{path}:3: bad captions row" in caplog.text
  with pytest.raises(ValueError, match=f"{path}:3: bad captions row"):
    build_lib.read_captions(path, strict=True)
  # An unterminated quote would swallow the rows after it: an error naming where it began.
  path.write_text('file,caption\na.png,"never closed\nb.png,fine\nc.png,fine\n')
  with pytest.raises(ValueError, match=f"{path}:2: .*unterminated quote"):
    build_lib.read_captions(path)
  jsonl = tmp_path / "c.jsonl"
  jsonl.write_text('{"file": "a.png", "caption": "ok"}\n{"file": "b.png", "caption": \n')
  assert set(build_lib.read_captions(jsonl)) == {"a.png"} and f"{jsonl}:2" in caplog.text
  src = tmp_path / "src"
  src.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "x.png")
  path.write_text('file,caption,label\nx.png,fine,one\n')
  assert build_lib.main(["--src", str(src), "--captions", str(path), "--out", str(tmp_path / "o"), "--strict"]) == 1
  assert not (tmp_path / "o").exists()
