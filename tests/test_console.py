"""What the command prints and writes besides the edits: warnings, version, records, quantization."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lusd_jax import __version__, cli, io, loading, pipeline, prompts
from lusd_jax.lusd.config import LUSDConfig


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lusd-jax {__version__}"


def test_no_pytorch_advice_and_no_raw_warnings_without_torch(tmp_path):
  # A machine without torch (the README's install): transformers would print advice on import.
  # The prompts tokenize identically, so the command stops after reading the tokenizer.
  code = (
    "import sys; sys.modules['torch'] = None\n"
    "from lusd_jax import cli\n"
    "sys.exit(cli.main(['edit', '--example', 'cat', '--model', 'tiny-random', '--source', 'a cat', "
    f"'--target', 'A  Cat', '--out', {str(tmp_path)!r}]))\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
  assert proc.returncode == 2, proc.stderr
  assert "PyTorch" not in proc.stderr and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]  # one line
  assert proc.stderr.startswith("error: --source")


def test_warnings_are_one_line_without_paths(capsys):
  cli._one_line_warning(UserWarning("first line\n  second line"), UserWarning, "/some/file.py", 12)
  err = capsys.readouterr().err
  assert err == "warning: first line second line\n"


@pytest.mark.parametrize(
  "error, code, line",
  [
    ((io.InputError, "--seeds: seed -1 is outside [0, 2**32)"), 2, "error: --seeds: seed -1"),
    ((loading.ModelLoadError, "no model at x"), 2, "error: no model at x"),
    ((FloatingPointError, "non-finite latents at step 3"), 1, "error: non-finite latents at step 3 (try"),
    ((KeyboardInterrupt,), 130, "interrupted"),
  ],
)
def test_one_error_handler_for_every_command(error, code, line, capsys, monkeypatch):
  kind, *message = error

  def command(args):
    raise kind(*message)  # a fresh exception per call: none outlives the test

  monkeypatch.delenv("LUSD_JAX_DEBUG", raising=False)
  assert cli.run_command(command, None) == code
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(line), lines
  if code != 130:  # LUSD_JAX_DEBUG=1: the traceback instead of the line
    monkeypatch.setenv("LUSD_JAX_DEBUG", "1")
    with pytest.raises(kind):
      cli.run_command(command, None)


def test_json_records_put_plain_arrays_on_one_line():
  record = {"rejections_per_step": [[0, 1, 2], [3, 4, 5]], "seeds": [0, 1], "note": "tokens [5, 6]"}
  text = io.json_text(record)
  assert json.loads(text) == record
  assert "    [0, 1, 2],\n    [3, 4, 5]\n" in text and '"seeds": [0, 1]' in text


@pytest.mark.parametrize("rounding", ["round", "truncate"])
def test_to_uint8_rounding(rounding):
  x = np.array([0.0, 0.5 / 255, 0.999, 1.0, 127.6 / 255], np.float32)
  got = io.to_uint8(x, rounding)
  want = np.round(x * 255) if rounding == "round" else np.floor(x * 255)
  np.testing.assert_array_equal(got, want.astype(np.uint8))
  with pytest.raises(ValueError, match="rounding"):
    io.to_uint8(x, "nearest")


def _fake_result(config, value):
  tok = loading.load_model_head("tiny-random").tokenizer
  tokens = prompts.find_edit_tokens(tok, "a cat", "a dog")
  return pipeline.EditResult(
    images=np.full((1, 64, 64, 3), value, np.float32),
    latents=np.zeros((1, 8, 8, 4), np.float32),
    input_image=np.zeros((64, 64, 3), np.float32),
    source_prompt="a cat",
    target_prompt="a dog",
    seeds=(0,),
    rejections=np.zeros((1, 2), np.int32),
    timesteps=np.full((1, 2), 500, np.int32),
    hit_max_attempts=np.zeros((1,), bool),
    mask=None,
    snapshots=None,
    latent_snapshots=None,
    mask_snapshots=None,
    snapshot_steps=(),
    edit_tokens=tokens,
    config=config,
    timings={"encode_s": 0.1},
    zero_gradient_steps=np.zeros((1,), np.int64),
  )


class _Model:
  name, dtype, is_random = "tiny-random", "float32", True


@pytest.mark.parametrize("preset, level", [("paper", 255), ("official", 254)])
def test_edits_are_saved_with_the_presets_rounding_and_a_random_weights_title(
  tmp_path, monkeypatch, preset, level
):
  config = LUSDConfig.official() if preset == "official" else LUSDConfig()
  titles = []
  from lusd_jax import visual

  grid = visual.grid
  monkeypatch.setattr(visual, "grid", lambda *a, **k: titles.append(k.get("title")) or grid(*a, **k))

  class Args:
    model = "tiny-random"

  cli._save_result(
    _fake_result(config, 0.999), _Model(), Args(), str(tmp_path), lambda s: "" if s is None else f"e{s}.png"
  )
  assert np.asarray(Image.open(tmp_path / "e0.png")).max() == level
  assert titles and titles[0].endswith("(random weights)")
  record = json.loads((tmp_path / "run.json").read_text())
  assert record["config"]["output_rounding"] == config.output_rounding
  assert record["config"]["edit_token_rule"] == config.edit_token_rule
  assert record["zero_gradient_steps"] == [0]
  assert '"timestep_per_step": [\n    [500, 500]\n  ]' in (tmp_path / "run.json").read_text()


def test_every_command_and_flag_has_help_with_its_default():
  parser = cli.build_parser()
  commands = parser._subparsers._group_actions[0].choices
  assert set(commands) >= {"edit", "batch", "convert", "sweep", "eval"}
  for name, sub in commands.items():
    assert sub.description, name
    for action in sub._actions:
      if action.dest == "help":
        continue
      assert action.help, (name, action.dest)
      has_default = action.default is not None and action.default is not False and not action.required
      if action.option_strings and has_default:
        assert "default" in action.help, (name, action.option_strings)


def test_large_image_warning_is_one_line(tmp_path, capsys, monkeypatch):
  # PIL warns between 1x and 2x its pixel limit (DecompressionBombWarning); shrink the limit.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
  Image.new("RGB", (200, 200), (10, 20, 30)).save(tmp_path / "big.png")  # 40,000 pixels
  argv = [
    "edit",
    str(tmp_path / "big.png"),
    "--source",
    "a cat",
    "--target",
    "A cat",
    "--model",
    "tiny-random",
  ]
  assert cli.main([*argv, "--size", "64", "--out", str(tmp_path / "o")]) == 2  # stops at the prompts
  err = capsys.readouterr().err
  warned = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warned) == 1 and "decompression bomb" in warned[0], err
  assert "big.png" not in warned[0] and ".py" not in err


def test_explanation_line_is_cut_to_a_sensible_length(tmp_path, capsys, monkeypatch):
  def load_model(*args, **kwargs):
    raise SystemExit(99)  # stop right after the checks; they have printed the notes

  monkeypatch.setattr(loading, "load_model", load_model)
  nouns = " ".join(f"a {w} and" for w in ["hat", "scarf", "coat", "boot", "glove", "belt", "ring"] * 3)
  Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
  argv = ["edit", str(tmp_path / "x.png"), "--source", "a cat", "--target", f"a cat with {nouns} a bag"]
  with pytest.raises(SystemExit):
    cli.main([*argv, "--model", "tiny-random", "--size", "64", "--out", str(tmp_path / "o")])
  out = capsys.readouterr().out
  line = next(line for line in out.splitlines() if line.startswith("edit words:"))
  assert len(line) <= pipeline.MAX_NOTE_CHARS and line.endswith("...")


def test_method_registry_feeds_the_method_flag():
  from lusd_jax import methods
  from lusd_jax.lusd.core import LUSD

  assert methods.get("lusd").method is LUSD and methods.get("lusd").config is LUSDConfig
  with pytest.raises(ValueError, match="choose one of: lusd"):
    methods.get("sdedit")
  edit = cli.build_parser()._subparsers._group_actions[0].choices["edit"]
  (method,) = [a for a in edit._actions if "--method" in a.option_strings]
  assert tuple(method.choices) == tuple(methods.METHODS)
  # Every registered method implements the engine's interface.
  for entry in methods.METHODS.values():
    for name in ("num_steps", "init", "step", "snapshot", "finish", "watched"):
      assert hasattr(entry.method, name), (entry.method, name)
    assert isinstance(entry.method, type) and entry.method.__hash__ is not None
