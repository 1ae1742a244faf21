"""The README's commands, as written there: its opening commands and its examples.

The example commands are read out of README.md and run with the paths replaced by
temporary ones (and, where the example names the published Wan 2.1 VAE, a tiny random
VAE of the same layout): if the README changes, the test follows it; if the command
stops working, the test fails.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The Wan 2.1 VAE layout at toy sizes: 4x temporal, 8x spatial compression, 4 channels.
TINY_VAE = ["vae.base_dim=8", "vae.z_dim=4", "vae.dim_mult=[1,2,2,2]", "vae.num_res_blocks=1",
            "model.in_channels=4"]


def readme_command(prefix: str) -> list[str]:
  """The README's first command line that starts with `prefix`, split into words."""
  for line in README.splitlines():
    if line.strip().startswith(prefix):
      return line.split("#")[0].split()
  raise AssertionError(f"README.md has no command starting with {prefix!r}")


def test_readme_opens_with_the_two_commands():
  first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
  assert first_block == ['pip install -e ".[test]" && python -m src.train --config configs/smoke.yaml',
                         "python -m pytest -q"]


def write_clip(path: Path, frames: int, height: int, width: int) -> None:
  av = pytest.importorskip("av")
  with av.open(str(path), "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=16)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
      image = np.full((height, width, 3), 30 + 5 * i, np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def run(args: list[str]) -> subprocess.CompletedProcess:
  r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.slow
def test_the_encode_example_writes_a_latent_cache(tmp_path):
  """`src.encode --config configs/encode_wan21.yaml ...` on a folder of clips of mixed
  sizes and a still image, with a VAE checkpoint written by the project itself."""
  from src import config as C
  from src.data.latents import LatentSource
  from src.models.vae import VideoVAE
  from src.pretrained import save_vae
  from flax import nnx

  clips = tmp_path / "clips"
  clips.mkdir()
  for name, (frames, h, w) in {"wide.mp4": (20, 32, 48), "tall.mp4": (18, 48, 32), "long.mp4": (36, 40, 40)}.items():
    write_clip(clips / name, frames, h, w)
  Image.fromarray(np.full((24, 40, 3), 200, np.uint8)).save(clips / "still.png")  # an image: a 1-frame clip
  (clips / "captions.jsonl").write_text("\n".join(json.dumps({"file": n, "caption": f"clip {n}"})
                                                  for n in ("wide.mp4", "tall.mp4", "long.mp4", "still.png")))
  run(["-m", "src.data.build", "--src", str(clips), "--captions", str(clips / "captions.jsonl"),
       "--out", str(tmp_path / "data")])
  vae_cfg = C.load(None, TINY_VAE).vae
  save_vae(VideoVAE(vae_cfg, rngs=nnx.Rngs(0)), vae_cfg, tmp_path / "vae")

  words = readme_command("python -m src.encode --config configs/encode_wan21.yaml")
  swap = {"latents/": str(tmp_path / "latents"), "data.data_dir=data/my_clips": f"data.data_dir={tmp_path / 'data'}",
          "vae.checkpoint=weights/wan21_vae": f"vae.checkpoint={tmp_path / 'vae'}"}
  assert set(swap) <= set(words), words  # the example names these paths
  run([*[swap.get(w, w) for w in words[1:]], *TINY_VAE, "data.area=1024"])
  cache = LatentSource(tmp_path / "latents")
  shapes = sorted(cache[i]["video"].shape for i in range(len(cache)))
  assert len(shapes) == 4 and len(set(shapes)) > 1  # four clips, kept at their own sizes
  assert sum(s[0] == 1 for s in shapes) >= 1  # the still image is one latent frame
  assert all(s[-1] == 4 and s[0] in (1, 1 + 16 // 4, 1 + 32 // 4) for s in shapes), shapes  # 1, 17 or 33 frames
