"""CLIP tokenizer: transformers' `CLIPTokenizer`, from a checkpoint or from the bundled BPE file.

Stable Diffusion checkpoints ship `tokenizer/vocab.json` and `tokenizer/merges.txt`; those load
with `load_tokenizer(folder)`. For the tiny random model (and the tests) no checkpoint exists, so
`bundled_tokenizer()` rebuilds the same two files from OpenAI's BPE merges
(`assets/bpe_simple_vocab_16e6.txt.gz`, redistributed from the open-clip-torch wheel, MIT), exactly as
OpenAI's `SimpleTokenizer` builds its vocabulary: 256 byte symbols, the same with `</w>`, 48894
merges, then `<|startoftext|>` and `<|endoftext|>` (49408 entries; "a cat" -> 49406, 320, 2368, 49407).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from importlib import resources

MAX_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
  """OpenAI CLIP's reversible byte -> printable unicode table."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  bs += list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def bpe_vocab_and_merges(bpe_gz_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[str]]:
  """Returns (vocab, merges) as `CLIPTokenizer` wants them, from a CLIP `bpe_simple_vocab` file."""
  if bpe_gz_path is None:
    bpe_gz_path = resources.files("lusd_jax") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
  with gzip.open(bpe_gz_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = lines[1 : _NUM_MERGES + 1]
  symbols = list(_bytes_to_unicode().values())
  symbols = symbols + [s + "</w>" for s in symbols]
  symbols += ["".join(m.split()) for m in merges]
  symbols += ["<|startoftext|>", "<|endoftext|>"]
  return {s: i for i, s in enumerate(symbols)}, merges


@functools.cache
def _bundled_tokenizer_dir() -> str:
  out = os.path.join(tempfile.gettempdir(), f"lusd_jax_clip_tokenizer_{os.getuid()}")
  os.makedirs(out, exist_ok=True)
  vocab_path = os.path.join(out, "vocab.json")
  if not os.path.exists(vocab_path):
    write_tokenizer_files(out)
  return out


def write_tokenizer_files(folder: str | os.PathLike, pad_token: str = "<|endoftext|>") -> None:
  """Writes `vocab.json`, `merges.txt` and `tokenizer_config.json` for a CLIP tokenizer (SD1 style)."""
  vocab, merges = bpe_vocab_and_merges()
  os.makedirs(folder, exist_ok=True)
  # Write through temporary names so a concurrent reader never sees half a file.
  files = {
    "vocab.json": json.dumps(vocab, ensure_ascii=False),
    "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    "tokenizer_config.json": json.dumps(
      {
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
      }
    ),
  }
  for name, text in files.items():
    fd, tmp = tempfile.mkstemp(dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, os.path.join(folder, name))


def load_tokenizer(folder: str | os.PathLike):
  """transformers' `CLIPTokenizer` from a checkpoint's `tokenizer/` folder."""
  from transformers import CLIPTokenizer

  return CLIPTokenizer.from_pretrained(os.fspath(folder))


def bundled_tokenizer():
  """A real CLIP tokenizer built from the bundled BPE file (no download)."""
  return load_tokenizer(_bundled_tokenizer_dir())


def tokenize(tokenizer, prompts: list[str]):
  """Token ids `[B, 77]` int32, padded and truncated as Stable Diffusion pipelines do."""
  import numpy as np

  out = tokenizer(
    list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np"
  )
  return np.asarray(out["input_ids"], dtype=np.int32)
