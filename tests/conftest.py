"""Test set-up: 8 host CPU devices, so every test run exercises sharding.

XLA_FLAGS must be set before JAX is imported anywhere, hence at the top of conftest.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import itertools  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_each_module():
  """After each test module, drop JAX's compiled programs and the module's dead arrays: the
  suite compiles thousands of programs in one process, and without this its memory grew
  about 250 MB a minute (a CI run once aborted inside XLA 40 minutes in)."""
  yield
  import gc

  jax.clear_caches()
  gc.collect()


def _synthetic_captions():
  """Every caption the synthetic source can write, plus a few other sentences."""
  from src.data.sources import DIRECTIONS, KINDS, NUMBER_WORDS, PALETTE

  for n, colour, kind, direction in itertools.product(NUMBER_WORDS, PALETTE, KINDS, DIRECTIONS):
    yield f"{n} {colour} {kind}{'' if n == 'a' else 's'} moving {direction}"
  yield from ("a video of shapes", "nothing at all", "the quick brown fox jumps over the lazy dog")


@pytest.fixture(scope="session")
def tiny_umt5(tmp_path_factory):
  """A random tiny umT5 model root in the Hugging Face layout, as a Wan 2.1 diffusers
  repository lays it out: `text_encoder/` (config.json + safetensors) and `tokenizer/`
  (a SentencePiece model trained on the synthetic captions' words, T5's special ids).
  Needs sentencepiece (the `text` extra)."""
  spm = pytest.importorskip("sentencepiece")
  import jax
  from flax import nnx

  from src.models.umt5 import UMT5Config, UMT5Encoder
  from src.text_encoder import save_pretrained_umt5

  root = tmp_path_factory.mktemp("tiny_umt5")
  (root / "tokenizer").mkdir()
  corpus = root / "captions.txt"
  corpus.write_text("\n".join(_synthetic_captions()))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "tokenizer" / "spiece"), vocab_size=56,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 character_coverage=1.0, minloglevel=2)
  cfg = UMT5Config(vocab_size=56, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
  encoder = UMT5Encoder(cfg, rngs=nnx.Rngs(jax.random.key(7)))
  save_pretrained_umt5(encoder, cfg, root / "text_encoder")
  return root


TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2)


TINY_WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                    latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0])


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
  """A random tiny diffusers Wan model root: `transformer/`, a `WanTransformer3DModel`
  (sharded safetensors + index) with every weight perturbed so that no zero- or
  one-initialised part can match by accident, and `vae/`, an `AutoencoderKLWan` with 4
  latent channels. Returns (root, the torch transformer). Needs torch + diffusers (the
  `interop` extra)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")

  torch.manual_seed(0)
  model = diffusers.WanTransformer3DModel(**TINY_WAN).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("tiny_wan")
  model.save_pretrained(root / "transformer", max_shard_size="40KB")  # several shards and their index
  vae = diffusers.AutoencoderKLWan(**TINY_WAN_VAE).eval()
  with torch.no_grad():  # non-unit norm scales, so a misplaced gamma shows
    for name, p in vae.named_parameters():
      if name.endswith("gamma"):
        p.uniform_(0.5, 1.5)
  vae.save_pretrained(root / "vae")
  return root, model
