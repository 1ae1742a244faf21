"""`python -m src.data.build`: a folder of videos/images + captions -> a tfds dataset.

The result is an ArrayRecord tfds dataset (`folder_videos` under --out) that the
`folder` source reads by index. Files are stored encoded, as they are: decoding,
frame sampling and resizing happen in grain's workers at training time, so one built
dataset serves any resolution or clip length, and a bad file costs a counted skip
there rather than a failed build here. Features are plain tensors/text, which tfds
reads without TensorFlow.

Captions: CSV with a header, or JSONL; fields `file` (relative to --src), `caption`,
optional `label` (int). Media files without a caption row are kept with an empty
caption (the pipeline decides whether that is usable); rows naming a missing file are
dropped with a warning.

Each file is probed first (its first frame decoded): one that no config could read
(undecodable, no video stream or frames, fewer than 3 colour channels) is left out,
named with the reason, and `build_report.json` beside the dataset records per split
what was built (counts, frame and size ranges, uncaptioned files) and what was
skipped. `--no-probe` stores every file unread (the pipeline then skips and counts
the bad ones at training time).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from src.data.sources import FOLDER_DATASET
from src.data.video import BadInput, probe

log = logging.getLogger(__name__)

MEDIA_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".png", ".jpg", ".jpeg")
NO_LABEL = -1
REPORT = "build_report.json"


def _rows(path: Path):
  """(line, row dict) of a CSV (with header, the csv module's default dialect and strict
  quoting) or JSONL captions file. An unterminated quote is an error naming the line
  where the quoted field began (it would otherwise swallow the rows after it)."""
  if path.suffix.lower() in (".jsonl", ".json"):
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if line.strip():
        try:
          yield i, json.loads(line)
        except ValueError as e:
          yield i, ValueError(f"not JSON ({e})")
    return
  with path.open(newline="") as f:
    reader = csv.DictReader(f, strict=True)
    start = 2  # the first row after the header
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        raise ValueError(f"{path}:{start}: {e} (an unterminated quote?)") from None
      yield start, row
      start = reader.line_num + 1


def read_captions(path: Path, strict: bool = False, skipped: list | None = None) -> dict[str, dict]:
  """file -> {'caption': str, 'label': int} from a CSV (with header) or JSONL file. A bad
  row (no file, a label that is not an integer, bad JSON) is skipped with a warning
  naming file and line (and appended to `skipped`), or is an error when `strict`."""
  if not path.is_file():
    raise FileNotFoundError(f"captions file not found: {path}")
  out = {}
  for line, row in _rows(path):
    try:
      if isinstance(row, Exception):
        raise row
      if not row.get("file"):
        raise ValueError("no 'file' field (the header must name file, caption[, label])")
      label = row.get("label")
      out[str(row["file"])] = {"caption": str(row.get("caption") or ""),
                               "label": NO_LABEL if label in (None, "") else int(label)}
    except (ValueError, TypeError, AttributeError) as e:
      message = f"{path}:{line}: bad captions row ({e})"
      if strict:
        raise ValueError(message + "; fix it, or build without --strict to skip such rows") from None
      log.warning("%s: skipped", message)
      if skipped is not None:
        skipped.append(message)
  return out


def list_entries(src: Path, captions: dict[str, dict]) -> list[tuple[str, dict]]:
  """(file relative to src, caption row) for every media file and every captioned file."""
  if not src.is_dir():
    raise FileNotFoundError(f"video folder not found: {src}")
  files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES}
  missing = sorted(name for name in captions if not (src / name).is_file())
  for name in missing:
    log.warning("captions name a missing file, dropped: %s", name)
  files |= set(captions) - set(missing)
  return [(name, captions.get(name, {"caption": "", "label": NO_LABEL})) for name in sorted(files)]


def _held_out(name: str) -> int:
  """A stable rank: the validation split does not depend on listing order."""
  return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def probe_entries(src: Path, entries: list[tuple[str, dict]]) -> tuple[dict[str, dict], dict[str, BadInput]]:
  """(file -> probe info, file -> why it cannot be read) for every entry."""
  infos, bad = {}, {}
  for name, _ in tqdm(entries, desc="probing", unit="file", file=sys.stderr, mininterval=2.0):
    try:
      infos[name] = probe((src / name).read_bytes())
    except BadInput as e:
      log.warning("skipped %s: %s", name, e)
      bad[name] = e
  return infos, bad


def _by_reason(skipped: dict[str, dict]) -> str:
  """'channels 1 (grey.png); undecodable 2 (a.mp4, b.webm)' of REPORT's `skipped`."""
  names = collections.defaultdict(list)
  for name, why in sorted(skipped.items()):
    names[why["reason"]].append(name)
  return "; ".join(f"{reason} {len(n)} ({', '.join(n)})" for reason, n in sorted(names.items()))


def split_report(entries: list[tuple[str, dict]], infos: dict[str, dict]) -> dict:
  """What a split holds: counts, frame and size ranges (of the probed files), files
  without a caption (skipped at training time while data.require_caption=true)."""
  kinds = collections.Counter(infos[name]["kind"] for name, _ in entries if name in infos)
  probed = [infos[name] for name, _ in entries if name in infos]
  out = {"files": len(entries), "videos": kinds["video"], "images": kinds["image"],
         "uncaptioned": sorted(name for name, row in entries if not row["caption"].strip())}
  if probed:
    out["frames"] = [min(i["frames"] for i in probed), max(i["frames"] for i in probed)]
    out["pixels"] = [min(i["height"] * i["width"] for i in probed), max(i["height"] * i["width"] for i in probed)]
  return out


def log_report(report: dict) -> None:
  for split in ("train", "validation"):
    if split in report:
      r = report[split]
      ranges = (f"; {r['frames'][0]}-{r['frames'][1]} frames, {r['pixels'][0]}-{r['pixels'][1]} pixels a frame"
                if "frames" in r else "")
      log.info("%s: %d files (%d videos, %d images)%s; %d without a caption%s", split, r["files"], r["videos"],
               r["images"], ranges, len(r["uncaptioned"]),
               " (skipped in training while data.require_caption=true)" if r["uncaptioned"] else "")
  if report.get("skipped"):
    log.warning("left out %d unreadable file(s): %s", len(report["skipped"]), _by_reason(report["skipped"]))
  if report.get("skipped_caption_rows"):
    log.warning("%d bad captions row(s) skipped (--strict makes them an error)", len(report["skipped_caption_rows"]))


class FolderVideos(tfds.core.GeneratorBasedBuilder):
  """Encoded media files with captions and labels. Constructed without `src` it can
  only read an already built dataset (that is how tfds instantiates it by name)."""

  name = FOLDER_DATASET  # what the folder source asks tfds for
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded file bytes, caption, label, filename."}
  # No download checksums live beside this code; and tfds' lookup of them imports
  # `importlib_resources`, which its pinned etils does not install.
  code_path = None

  def __init__(self, *, src: str | None = None, captions: str | None = None, val_count: int = 0,
               strict: bool = False, probe: bool = True, **kwargs):
    self._src, self._captions, self._val_count, self._strict = src, captions, val_count, strict
    self._probe, self.report = probe, {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Videos and images of a folder, stored encoded, with their captions.",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes
            "caption": tfds.features.Text(),
            "label": tfds.features.Scalar(dtype=np.int64),
            "filename": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    if self._src is None:
      raise ValueError("FolderVideos needs src= and captions= to build")
    src = Path(self._src)
    skipped = []
    entries = list_entries(src, read_captions(Path(self._captions), self._strict, skipped))
    if not entries:
      raise ValueError(f"no media files ({', '.join(MEDIA_SUFFIXES)}) in {src}")
    infos, bad = probe_entries(src, entries) if self._probe else ({}, {})
    bad = {name: {"reason": e.reason, "detail": e.detail} for name, e in bad.items()}
    entries = [e for e in entries if e[0] not in bad]
    if not entries:
      raise ValueError(f"none of the {len(bad)} media files in {src} can be read: {_by_reason(bad)}")
    held = set(sorted((name for name, _ in entries), key=_held_out)[:self._val_count])
    parts = {"train": [e for e in entries if e[0] not in held], "validation": [e for e in entries if e[0] in held]}
    parts = {split: part for split, part in parts.items() if part}
    self.report = {split: split_report(part, infos) for split, part in parts.items()}
    self.report["skipped"] = dict(sorted(bad.items()))
    self.report["skipped_caption_rows"] = skipped
    return {split: self._generate_examples(src, part) for split, part in parts.items()}

  def _generate_examples(self, src: Path, entries: list[tuple[str, dict]]):
    for name, row in entries:
      yield name, {"video": (src / name).read_bytes(), "caption": row["caption"], "label": row["label"],
                   "filename": name}


def build(src: str, captions: str, out: str, val_count: int = 0, overwrite: bool = False,
          strict: bool = False, probe: bool = True) -> Path:
  """Build (or reuse) the dataset under `out`; returns its directory, which holds the
  build report (REPORT). `strict`: a bad captions row fails the build instead of being
  skipped; `probe=False` stores files without reading them."""
  if not Path(src).is_dir():  # before tfds creates anything under `out`
    raise FileNotFoundError(f"video folder not found: {src}")
  if not Path(captions).is_file():
    raise FileNotFoundError(f"captions file not found: {captions}")
  if strict:  # fail before tfds creates anything
    read_captions(Path(captions), strict=True)
  builder = FolderVideos(src=src, captions=captions, val_count=val_count, strict=strict, probe=probe,
                         data_dir=out, file_format="array_record")
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if overwrite:
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  elif Path(builder.data_path, "dataset_info.json").is_file():
    log.warning("%s exists and is reused as it is; pass --overwrite to rebuild it", builder.data_path)
  tfds.disable_progress_bar()  # tfds' bars and its "Downloading and preparing" lines say nothing here
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  path = Path(builder.data_path)
  if builder.report:  # built now (a reused dataset keeps the report of its build)
    (path / REPORT).write_text(json.dumps(builder.report, indent=1) + "\n")
  if (path / REPORT).is_file():
    log_report(json.loads((path / REPORT).read_text()))
  log.info("dataset %s: %s; use data.source=folder data.data_dir=%s", path,
           ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()), out)
  return path


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m src.data.build",
      description="Turn a folder of videos/images (mp4, webm, gif, png, jpg, ...) and a captions file "
      "into a tfds ArrayRecord dataset for data.source=folder (data.data_dir=OUT).",
      epilog="example: python -m src.data.build --src clips/ --captions clips/captions.csv --out data/clips",
  )
  parser.add_argument("--src", required=True, help="folder of media files (searched recursively)")
  parser.add_argument("--captions", required=True, help="CSV (header: file,caption[,label]) or JSONL")
  parser.add_argument("--out", required=True, help="tfds data_dir to write; use it as data.data_dir")
  parser.add_argument("--val_count", type=int, default=0, help="files held out as the 'validation' split")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
  parser.add_argument("--strict", action="store_true", help="a bad captions row fails the build (default: skipped)")
  parser.add_argument("--no-probe", dest="probe", action="store_false",
                      help="store every file without decoding its first frame (faster on huge folders; unreadable "
                      "files are then skipped, and counted, at training time)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # tfds' own account of its files
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    build(args.src, args.captions, args.out, args.val_count, args.overwrite, args.strict, args.probe)
  except (FileNotFoundError, ValueError) as e:
    log.error("%s", e)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
