"""The umT5 tokenizer (Wan 2.1's text encoder) and Wan's prompt cleaning, without PyTorch.

Reads a diffusers `tokenizer/` folder: `tokenizer.json` through Hugging Face
`tokenizers` when present (what transformers' fast tokenizer reads), else
`spiece.model` through `sentencepiece`, with the token names of
`tokenizer_config.json` / `special_tokens_map.json` (T5's `</s>`, `<pad>`, `<unk>`
when absent; their ids always come from the vocabulary). `Tokenizer(texts, Lc)` gives
what transformers' `T5Tokenizer(texts, padding="max_length", max_length=Lc,
truncation=True, add_special_tokens=True, return_attention_mask=True)` gives, as the
diffusers WanPipeline calls it (`_get_t5_prompt_embeds`, Lc=512 from `__call__`):
the caption's tokens, truncated to Lc-1, then EOS, then padding.

One difference is on purpose. transformers 5.x's T5Tokenizer rebuilds the backend with
`byte_fallback=False`, so with a byte-fallback vocabulary a character outside it turns
into `<unk>`. Here the files are followed: sentencepiece, and a tokenizer.json used as
written, give its UTF-8 byte pieces, as transformers 4.x and the original Wan code did.

B captions, Lc tokens per caption (the conditioning length).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import re
from pathlib import Path

import numpy as np

TOKENIZER_JSON = "tokenizer.json"
SPIECE_MODEL = "spiece.model"
CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # the later one wins, as in transformers
T5_TOKENS = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}  # T5Tokenizer's defaults
T5_EXTRA_IDS = 100  # T5Tokenizer's default number of <extra_id_N> sentinels appended to a spiece vocabulary
# diffusers' whitespace_clean uses the `regex` module, whose \s is Unicode White_Space: unlike `re`'s \s it
# leaves the separators U+001C..U+001F alone. Spelled out so `re` matches the same characters.
WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
  """Wan's `prompt_clean` (diffusers pipeline_wan): ftfy's fix_text when ftfy is importable
  (it is optional, as in diffusers), html unescaping twice, then whitespace runs collapsed to
  one space and the ends stripped. Apply it before the tokenizer, as the pipeline does."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  return WHITESPACE.sub(" ", text).strip()


def find_tokenizer_files(path: str | Path) -> Path:
  """The file to read: tokenizer.json, else spiece.model, in `path` or in its `tokenizer/`."""
  root = Path(path)
  for folder in (root, root / "tokenizer"):
    for name in (TOKENIZER_JSON, SPIECE_MODEL):
      if (folder / name).is_file():
        return folder / name
  what = "no such directory" if not root.is_dir() else f"neither {TOKENIZER_JSON} nor {SPIECE_MODEL} in it"
  raise FileNotFoundError(f"tokenizer path {root}: {what} (expected a tokenizer directory with {TOKENIZER_JSON} "
                          f"or {SPIECE_MODEL}, or a model root whose tokenizer/ holds one)")


def _token_names(folder: Path) -> dict:
  """tokenizer_config.json / special_tokens_map.json over T5's defaults (a token may be a dict)."""
  found = dict(T5_TOKENS, extra_ids=T5_EXTRA_IDS)
  for name in CONFIG_FILES:
    if (folder / name).is_file():
      found.update(json.loads((folder / name).read_text()))
  names = {k: v["content"] if isinstance(v, dict) else v for k, v in found.items() if k in T5_TOKENS}
  return dict(names, extra_ids=int(found.get("extra_ids") or 0))


class _JsonBackend:
  """tokenizer.json as written: its normalizer, pre-tokenizer, model and added tokens."""

  def __init__(self, file: Path):
    import tokenizers
    self.tok = tokenizers.Tokenizer.from_file(str(file))
    self.tok.no_truncation()  # truncation and padding are done in `Tokenizer.__call__`, around the EOS
    self.tok.no_padding()
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

  def id_of(self, token: str) -> int | None:
    return self.tok.token_to_id(token)

  def encode(self, texts: list[str]) -> list[list[int]]:
    # No post-processor: the EOS is appended by the caller, as T5Tokenizer replaces any template with `$A </s>`.
    return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


class _SpieceBackend:
  """spiece.model through sentencepiece, plus transformers' handling of special tokens in the text:
  `</s>`, `<pad>`, `<unk>` and the `<extra_id_N>` sentinels (appended after the pieces, N=0 last)
  are matched in the raw text, and the text between them is encoded piece by piece."""

  def __init__(self, file: Path, names: dict):
    import sentencepiece
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
    pieces, extra = self.sp.get_piece_size(), names["extra_ids"]
    self.vocab_size = pieces + extra
    self.specials = {f"<extra_id_{i}>": pieces + extra - 1 - i for i in range(extra)}
    self.specials |= {names[k]: i for k in T5_TOKENS if (i := self.id_of(names[k])) is not None}
    by_length = sorted(self.specials, key=len, reverse=True)  # the longest match wins, as in `tokenizers`
    self.split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")").split if by_length else lambda t: [t]

  def id_of(self, token: str) -> int | None:
    i = self.sp.piece_to_id(token)  # the unk id for a token it lacks
    return i if self.sp.id_to_piece(i) == token else None

  def encode(self, texts: list[str]) -> list[list[int]]:
    parts = [[self.specials[p] if n % 2 else p for n, p in enumerate(self.split(t)) if p] for t in texts]
    chunks = iter(self.sp.encode([p for ps in parts for p in ps if isinstance(p, str)]))  # one batched call
    return [[i for p in ps for i in ([p] if isinstance(p, int) else next(chunks))] for ps in parts]


@functools.lru_cache(maxsize=4)
def _load_backend(file: str) -> _JsonBackend | _SpieceBackend:
  """One loaded backend per file and process: grain workers build theirs on first use."""
  path = Path(file)
  names = _token_names(path.parent)
  backend = _JsonBackend(path) if path.name == TOKENIZER_JSON else _SpieceBackend(path, names)
  ids = {key: backend.id_of(names[key]) for key in ("eos_token", "pad_token")}
  missing = [f"{key} {names[key]!r}" for key, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"tokenizer {path}: {' and '.join(missing)} not in the vocabulary (set it in "
                     f"{path.parent / 'tokenizer_config.json'})")
  backend.eos_id, backend.pad_id = ids["eos_token"], ids["pad_token"]
  return backend


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Captions -> (ids, mask), each int32 [B, Lc]. Holds only its file's path, so it pickles as that:
  each process loads the file once, on first use (`_load_backend` caches it), and grain workers can
  hold one."""

  file: str  # the tokenizer.json or spiece.model it reads

  @property
  def _backend(self):
    return _load_backend(self.file)

  @property
  def eos_id(self) -> int:
    return self._backend.eos_id

  @property
  def pad_id(self) -> int:
    return self._backend.pad_id

  @property
  def vocab_size(self) -> int:
    """Ids lie in [0, vocab_size): the vocabulary with its added tokens (transformers' len(tokenizer))."""
    return self._backend.vocab_size

  def __call__(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of each caption (truncated to max_length-1), its EOS, then pad_id up to max_length;
    mask 1 on the tokens and the EOS, 0 on the padding. Texts are tokenized as given: clean them first
    (`clean_prompt`) to match the WanPipeline."""
    if isinstance(texts, str) or max_length < 1:
      raise ValueError(f"expected a list of captions and max_length >= 1, got {type(texts).__name__}, {max_length}")
    backend = self._backend
    ids = np.full((len(texts), max_length), backend.pad_id, np.int32)  # [B, Lc]
    mask = np.zeros((len(texts), max_length), np.int32)  # [B, Lc]
    for row, tokens in enumerate(backend.encode(list(texts))):
      tokens = tokens[:max_length - 1] + [backend.eos_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def load_tokenizer(path: str | Path) -> Tokenizer:
  """The tokenizer of a tokenizer directory or of a model root whose tokenizer/ holds it. Loads it
  at once, so a bad file fails here rather than in a data worker."""
  file = str(find_tokenizer_files(path).resolve())
  _load_backend(file)
  return Tokenizer(file)
