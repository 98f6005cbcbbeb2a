import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# Commands run by the tests turn on the persistent compilation cache: keep it in the checkout (shared
# by the xdist workers, ignored by git) rather than in the user's ~/.cache/lusd_jax.
os.environ.setdefault(
  "LUSD_JAX_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "xla"),
)

from lusd_jax.compilation_cache import enable_compilation_cache  # noqa: E402
from tests import builders  # noqa: E402

# The same cache for every test, not only the commands' (xdist workers and notebook kernels share it):
# tests that run the same program (model config, shapes, static settings) compile it once.
enable_compilation_cache()


@pytest.fixture(scope="module")
def no_nltk_data(tmp_path_factory):
  """No NLTK data anywhere: the POS tagger must be the offline one from the textblob-aptagger wheel."""
  import nltk

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(nltk.data, "path", [str(tmp_path_factory.mktemp("empty_nltk_data"))])
    yield


@pytest.fixture(scope="module")
def tok():
  """The real CLIP tokenizer, built from the bundled BPE file."""
  from lusd_jax.tokenizer import bundled_tokenizer

  return bundled_tokenizer()


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
  """A complete tiny SD1-style diffusers checkpoint folder (random weights, real tokenizer)."""
  return builders.build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny_sd1"), "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
  """A complete tiny SD2-style folder: linear projection, per-block heads, v-prediction."""
  return builders.build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny_sd2"), "sd2", seed=1)


@pytest.fixture(scope="module")
def torch_one_thread():
  """PyTorch on one thread while a module's references run, restored afterwards.

  The machines that run the tests are shared (CI: two xdist workers on two cores): with a thread per
  core, torch's workers wait on each other and a tiny U-Net's forward takes about 10x longer.
  """
  import torch

  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)
