"""src.tokenizer: the umT5 tokenizer equals transformers' T5Tokenizer, called as the WanPipeline
calls it, for the same files, through spiece.model (sentencepiece) and through tokenizer.json
(tokenizers); and clean_prompt equals the pipeline's prompt_clean.

The SentencePiece models are trained here, on generated multilingual sentences, with T5's ids
(pad 0, eos 1, unk 2, no bos). Korean, Arabic and 🦄 are left out of the training text, so they are
out of the vocabulary. Tests skip without sentencepiece, tokenizers or transformers (the `text` and
`interop` extras); the clean_prompt tests need none of them.
"""

import pickle
import random
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from src import tokenizer as tokenizer_lib
from src.tokenizer import clean_prompt, load_tokenizer

WORDS = {
  "en": "the a cat dog runs over quickly bright red car river mountain sunset slowly camera pans across city at "
        "night woman man walks street rain umbrella ocean waves beach golden light close up shot of".split(),
  "de": "der die das ein Hund läuft schnell über große Straße Brücke schön Mädchen Grüße Fluss Wald Nacht".split(),
  "fr": "le la un chat chien court très vite élégant château forêt été où garçon crème déjà noël".split(),
  "ru": "кошка бежит по улице быстро красивый город ночью собака река".split(),
  "zh": list("一只猫在草地上奔跑城市夜晚灯光海边日落"),
  "ja": list("猫が公園で走っているカメラ夜の街"),
  "emoji": list("🐱🐶🌅🚗✨"),
}
CAPTIONS = [
  "a cat runs over the bright red car",
  "",
  " ",
  "der Hund läuft schnell über die große Straße",
  "le chat élégant court très vite dans la forêt, où?",
  "一只猫在草地上奔跑",
  "猫が公園で走っている",
  "кошка бежит по улице ночью",
  "🐱 ✨ a dog 🐶 at sunset 🌅",
  "   leading, trailing   and    multiple spaces   ",
  "new\nlines\n\nand\ttabs\r\nand\u00a0no-break\u3000spaces",
  "한국어 고양이 and العربية 🦄🦄",  # out of the vocabulary: <unk>
  "a </s> inside, <pad> and <unk> and <extra_id_0> too",  # special tokens in the text
  " ".join(["the camera pans slowly across the city at night"] * 12),  # longer than every max_length
  "Grüße aus Köln — déjà vu, noël, ÉTÉ",
]
MAX_LENGTHS = (1, 8, 64)


def sentences(seed: int, n: int = 600) -> list[str]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    lang = rng.choice(sorted(WORDS))
    out.append(("" if lang in ("zh", "ja") else " ").join(rng.choices(WORDS[lang], k=rng.randint(3, 12))))
  return out


def train_spiece(folder, vocab_size: int, **ids):
  """A unigram spiece.model in `folder` (T5's ids unless `ids` says otherwise)."""
  spm = pytest.importorskip("sentencepiece")
  folder.mkdir(parents=True, exist_ok=True)
  spec = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) | ids
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(0)), model_prefix=str(folder / "spiece"),
                                 model_type="unigram", vocab_size=vocab_size, character_coverage=1.0,
                                 minloglevel=2, **spec)
  (folder / "spiece.vocab").unlink()
  return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{"spiece": a folder with only spiece.model, "json": transformers' save_pretrained of it
  (tokenizer.json and tokenizer_config.json, no spiece.model)}."""
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("tokenizers")
  spiece = train_spiece(tmp_path_factory.mktemp("spiece"), vocab_size=400)
  saved = tmp_path_factory.mktemp("json")
  transformers.T5Tokenizer.from_pretrained(str(spiece)).save_pretrained(str(saved))
  return {"spiece": spiece, "json": saved}


def reference(folder, texts, max_length):
  """transformers' answer, as the WanPipeline asks for it (pipeline_wan._get_t5_prompt_embeds)."""
  from transformers import T5Tokenizer
  # transformers 5.x: T5Tokenizer(vocab_file=...) ignores the file (a 4-token placeholder vocabulary);
  # from_pretrained on the folder is what reads it (converts spiece.model, or reads tokenizer.json).
  tok = T5Tokenizer.from_pretrained(str(folder))
  out = tok(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
            return_attention_mask=True)
  return np.array(out["input_ids"]), np.array(out["attention_mask"]), tok


@pytest.mark.parametrize("source", ["spiece", "json"])
def test_matches_transformers(folders, source):
  tok = load_tokenizer(folders[source])
  assert tok.file.endswith({"spiece": "spiece.model", "json": "tokenizer.json"}[source])
  for max_length in MAX_LENGTHS:
    want_ids, want_mask, hf = reference(folders[source], CAPTIONS, max_length)
    ids, mask = tok(CAPTIONS, max_length)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (len(CAPTIONS), max_length)
    np.testing.assert_array_equal(ids, want_ids, err_msg=f"{source}, max_length={max_length}")
    np.testing.assert_array_equal(mask, want_mask, err_msg=f"{source}, max_length={max_length}")
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (hf.eos_token_id, hf.pad_token_id, len(hf)) == (1, 0, 500)
  lengths = mask.sum(1)
  assert (lengths == max_length).any() and (lengths < max_length).any(), "truncated and padded rows both occur"
  assert (ids == hf.unk_token_id).any() and (ids == hf.convert_tokens_to_ids("<extra_id_0>")).any(), "not vacuous"


def test_byte_fallback_follows_the_files(tmp_path):
  """With a byte-fallback vocabulary (as mT5's), an unknown character is its UTF-8 byte pieces, as
  sentencepiece gives them, through spiece.model and through a tokenizer.json alike. (transformers
  5.x's T5Tokenizer drops byte_fallback and gives <unk>; see the module docstring of src.tokenizer.)
  The ids here are not T5's, so they must be read from the files."""
  spm = pytest.importorskip("sentencepiece")
  transformers = pytest.importorskip("transformers")
  folder = train_spiece(tmp_path / "spiece", vocab_size=600, byte_fallback=True, unk_id=0, pad_id=1, eos_id=2)
  sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
  saved = tmp_path / "json"  # transformers' SentencePiece-faithful backend: its template appends no EOS
  transformers.TokenizersBackend.from_pretrained(str(folder), vocab_file=str(folder / "spiece.model"),
                                                 eos_token="</s>", pad_token="<pad>").save_pretrained(str(saved))
  texts = [c for c in CAPTIONS if "</s>" not in c]  # raw sentencepiece knows no special tokens in the text
  want = np.full((len(texts), 64), sp.pad_id())
  for row, text in enumerate(texts):
    tokens = sp.encode(text)[:63] + [sp.eos_id()]
    want[row, :len(tokens)] = tokens
  assert any(sp.id_to_piece(int(i)).startswith("<0x") for i in want.flat), "byte pieces occur"
  for path in (folder, saved):
    tok = load_tokenizer(path)
    assert (tok.eos_id, tok.pad_id) == (2, 1)
    ids, mask = tok(texts, 64)
    np.testing.assert_array_equal(ids, want, err_msg=str(path))
    np.testing.assert_array_equal(mask, want != sp.pad_id())


def test_a_model_root_and_the_preferred_file(folders, tmp_path):
  root = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
  shutil.copytree(folders["spiece"], root / "tokenizer")
  assert load_tokenizer(root).file.endswith("tokenizer/spiece.model")
  shutil.copytree(folders["json"], root / "tokenizer", dirs_exist_ok=True)
  assert load_tokenizer(root).file.endswith("tokenizer/tokenizer.json"), "tokenizer.json wins when both are there"


def test_a_missing_tokenizer_is_named(tmp_path):
  for path, why in ((tmp_path / "nowhere", "no such directory"), (tmp_path, "neither")):
    with pytest.raises(FileNotFoundError) as error:
      load_tokenizer(path)
    for part in (str(path), why, "tokenizer.json", "spiece.model", "tokenizer/"):
      assert part in str(error.value)


@pytest.mark.parametrize("source", ["spiece", "json"])
def test_pickles_into_a_fresh_process(folders, source):
  """What a grain worker gets: the pickled tokenizer, loading its file anew in a spawned process."""
  tok = load_tokenizer(folders[source])
  assert len(pickle.dumps(tok)) < 500, "only the path travels"
  want = tok(CAPTIONS, 16)
  with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
    got = pool.submit(tok, CAPTIONS, 16).result()
  tokenizer_lib._load_backend.cache_clear()  # and a copy in this process, loading afresh
  again = pickle.loads(pickle.dumps(tok))(CAPTIONS, 16)
  for other in (got, again):
    np.testing.assert_array_equal(other[0], want[0])
    np.testing.assert_array_equal(other[1], want[1])


def test_clean_prompt():
  assert clean_prompt("  a&amp;amp;b &lt;i&gt;\n\n c\u3000d\u00a0e\t ") == "a&b <i> c d e"
  assert clean_prompt("\u2028x\x1cy  ") == "x\x1cy", "U+001C..U+001F are not whitespace to Unicode (or diffusers)"
  assert clean_prompt("") == ""


def test_clean_prompt_matches_diffusers():
  wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
  prompts = ["  a&amp;amp;b &lt;i&gt;\n\n c\u3000d\u00a0e\t ", "x\x1cy\x1d z\x85w", "&#39;quoted&#39;  \u2029",
             "plain", "", "\t\n", "Grüße — déjà vu\u200b!"] + CAPTIONS
  for prompt in prompts:
    assert clean_prompt(prompt) == wan.prompt_clean(prompt), repr(prompt)
