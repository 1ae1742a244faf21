"""Writing videos: the [-1, 1] -> uint8 mapping, PNG grids, GIFs and MP4s, read back."""

import numpy as np
import pytest
from PIL import Image, ImageSequence

from src import media

GAP = media.GRID_GAP


def flat(t, h, w, value, channels=3):
  """[T, H, W, C] float video; frame i is `value(i)` everywhere (a scalar or an RGB)."""
  return np.stack([np.broadcast_to(np.asarray(value(i), np.float32), (h, w, channels)) for i in range(t)])


def ramp(t, h=4, w=6):
  """Frames of distinct flat greys in [-1, 1]: frame i of t at -1 + 2 i / (t - 1)."""
  return flat(t, h, w, lambda i: -1.0 + 2.0 * i / (t - 1))


# The value mapping


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255_clipping_outside():
  v = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 1, 7, 1)
  out = media.to_uint8(v)
  assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 64, 128, 191, 255, 255])
  assert (out == out[..., :1]).all()  # one channel: grey


def test_to_uint8_channels_two_pads_blue_and_more_than_three_keeps_rgb():
  two = media.to_uint8(np.ones((1, 1, 1, 2), np.float32))
  np.testing.assert_array_equal(two[0, 0, 0], [255, 255, 0])
  four = media.to_uint8(np.array([1.0, -1.0, 0.0, 1.0], np.float32).reshape(1, 1, 1, 4))
  np.testing.assert_array_equal(four[0, 0, 0], [255, 0, 128])


# PNG grids


def test_grid_puts_videos_in_rows_and_frames_in_columns():
  h, w = 4, 6
  videos = [flat(3, h, w, lambda i, r=r: [-1.0 + 0.5 * r, -1.0 + 0.5 * i, 1.0]) for r in range(2)]
  image = media.grid(videos)
  assert image.shape == (2 * (h + GAP), 3 * (w + GAP), 3) and image.dtype == np.uint8
  for r in range(2):
    for c in range(3):
      cell = image[r * (h + GAP):r * (h + GAP) + h, c * (w + GAP):c * (w + GAP) + w]
      np.testing.assert_array_equal(cell, np.broadcast_to(media.to_uint8(videos[r][c:c + 1])[0], cell.shape))
  assert not image[h:h + GAP].any() and not image[:, w:w + GAP].any()  # black gaps


def test_grid_pads_short_videos_with_black_and_scales_by_repetition():
  small = flat(2, 2, 3, lambda i: 0.5)  # 2 frames of 2x3 in a grid of 3 frames of 4x6
  videos = [ramp(3), small]
  image = media.grid(videos, scale=2)
  h, w = 4, 6  # the largest cell
  assert image.shape == (2 * 2 * (h + GAP), 2 * 3 * (w + GAP), 3)
  row = image[2 * (h + GAP):]  # the second video, scaled
  for c in range(2):
    x = 2 * c * (w + GAP)
    assert (row[:2 * 2, x:x + 2 * 3] == 191).all()
    assert not row[2 * 2:, x:x + 2 * w].any() and not row[:, x + 2 * 3:x + 2 * (w + GAP)].any()
  assert not row[:, 2 * 2 * (w + GAP):].any()  # the missing third frame
  np.testing.assert_array_equal(media.grid(videos, 1).repeat(2, 0).repeat(2, 1), image)


def test_png_grid_reads_back_with_pil(tmp_path):
  image = media.grid([ramp(3), ramp(3)[::-1]])
  media.write_png(tmp_path / "grid.png", image)
  with Image.open(tmp_path / "grid.png") as im:
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), image)


def test_write_video_png_is_the_one_row_grid(tmp_path):
  video = ramp(3)
  media.write_video(tmp_path / "v.png", video, scale=2)
  with Image.open(tmp_path / "v.png") as im:
    np.testing.assert_array_equal(np.asarray(im), media.grid([video], scale=2))


def test_write_video_refuses_other_suffixes(tmp_path):
  with pytest.raises(ValueError, match=".mp4, .gif or .png"):
    media.write_video(tmp_path / "v.webm", ramp(2))


# GIF


def test_gif_has_every_frame_at_its_size_and_values(tmp_path):
  video = ramp(5)  # distinct frames: Pillow merges identical neighbours
  media.write_video(tmp_path / "v.gif", video, scale=3)
  expected = media.to_uint8(video)[:, 0, 0]  # [T, 3]: each frame is flat
  with Image.open(tmp_path / "v.gif") as im:
    assert im.n_frames == 5 and im.size == (6 * 3, 4 * 3)
    assert im.info["duration"] == media.GIF_FRAME_MS and im.info["loop"] == 0
    frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
  for frame, rgb in zip(frames, expected):
    assert frame.shape == (12, 18, 3)
    np.testing.assert_array_equal(frame, np.broadcast_to(rgb, frame.shape))


# MP4


def read_mp4(path):
  av = pytest.importorskip("av")
  with av.open(str(path)) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_mp4_has_every_frame_at_its_size(tmp_path):
  pytest.importorskip("av")
  media.write_video(tmp_path / "v.mp4", ramp(6, h=8, w=10), scale=2)
  frames = read_mp4(tmp_path / "v.mp4")
  assert frames.shape == (6, 16, 20, 3)


def test_mp4_crops_odd_sizes_to_even(tmp_path):
  pytest.importorskip("av")
  media.write_video(tmp_path / "v.mp4", ramp(3, h=9, w=7))
  assert read_mp4(tmp_path / "v.mp4").shape == (3, 8, 6, 3)


def test_mp4_flat_colours_survive_approximately(tmp_path):
  """Lossy (yuv420p, H.264): each frame's colour within a few levels, per channel."""
  pytest.importorskip("av")
  colours = [[0.5, -0.5, 0.0], [-1.0, 1.0, -1.0], [0.9, 0.9, 0.9], [-0.8, -0.2, 0.6]]
  video = flat(len(colours), 16, 16, lambda i: colours[i])
  media.write_video(tmp_path / "v.mp4", video)
  frames = read_mp4(tmp_path / "v.mp4").astype(np.int32)
  expected = media.to_uint8(video)[:, 0, 0].astype(np.int32)  # [T, 3]
  assert frames.shape == (4, 16, 16, 3)
  np.testing.assert_allclose(frames.mean(axis=(1, 2)), expected, atol=4)  # 2 levels measured
  assert np.abs(frames - expected[:, None, None]).max() <= 8
