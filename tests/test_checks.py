"""Every bad input is stopped before the model's weights load (and before any compute).

Each case runs the command in-process with `loading.load_model` replaced by a function that fails
the test: the error must come from the checks that read only the tokenizer and scheduler config.
"""

import os

import numpy as np
import pytest

from lusd_jax import cli, io, loading, pipeline
from lusd_jax.cli import add_sweep_arguments, sweep_command
from lusd_jax.lusd import config as config_lib
from lusd_jax.lusd.config import LUSDConfig


@pytest.fixture
def no_load(monkeypatch):
  """Fails the test if a model's weights are loaded."""

  def load_model(*args, **kwargs):
    raise AssertionError(f"the model was loaded: load_model{args}")

  monkeypatch.setattr(loading, "load_model", load_model)


def _error_line(capsys) -> str:
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, err
  assert "Traceback" not in err
  return lines[0]


def _fill(args, tmp_path):
  """Replaces {file} (an existing file) and {ro} (a folder that cannot be written) in arguments."""
  (tmp_path / "file").write_text("not a folder")
  subs = {"{file}": str(tmp_path / "file"), "{ro}": str(_read_only_dir(tmp_path))}
  return [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in args]


def _read_only_dir(tmp_path):
  """A folder this process cannot write to (chmod for users; /sys/kernel is read-only for root)."""
  if os.geteuid() != 0:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder
  return "/sys/kernel"


EDIT = ["edit", "--example", "cat", "--model", "tiny-random", "--size", "64", "--quiet"]


@pytest.mark.parametrize(
  "extra, words",
  [
    # Prompts CLIP cannot tell apart: g = 0 at every draw, nothing to edit.
    (["--source", "a cat", "--target", "A  cat"], ["--source", "--target", "nothing to edit"]),
    (["--seeds", "-1"], ["--seeds", "-1", "[0, 2**32)"]),
    (["--seeds", "99999999999"], ["--seeds", "99999999999"]),
    (["--init-seed", "4294967295", "--num-seed", "2"], ["--init-seed", "4294967296"]),
    (["--seeds", "3", "3"], ["--seeds", "repeated"]),
    (["--t-max", "5000"], ["--t-max", "1000"]),
    (["--t-min", "1200", "--t-max", "1500"], ["--t-max", "1000"]),
    (["--t-min", "900", "--t-max", "100"], ["--t-max", "--t-min"]),
    (["--lr", "-1"], ["--lr", ">= 0"]),
    (["--save-step", "-5"], ["--save-step"]),
    (["--edit-words", "unicorn"], ["--edit-words", "unicorn"]),
    (["--out", "{file}"], ["--out", "is a file"]),
    (["--out", "{file}/sub"], ["--out", "is a file"]),
    (["--out", "{ro}/sub"], ["--out", "cannot write"]),
  ],
)
def test_edit_rejects_bad_input_before_loading(extra, words, tmp_path, capsys, no_load):
  argv = [*EDIT, "--out", str(tmp_path / "out"), *_fill(extra, tmp_path)]
  assert cli.main(argv) == 2
  line = _error_line(capsys)
  for word in words:
    assert word in line, line
  assert "LUSDConfig." not in line  # flags, not field names


@pytest.mark.parametrize(
  "extra, words",
  [
    (["--seeds", "-1"], ["--seeds"]),
    (["--source", "a cat", "--target", "a  CAT"], ["nothing to edit"]),
    (["--set", "t_max=5000"], ["--t-max", "1000"]),
    (["--out", "{file}"], ["--out", "is a file"]),
    (["--devices", "0"], ["--devices: 0 asked"]),
  ],
)
def test_sweep_rejects_bad_input_before_loading(extra, words, tmp_path, capsys, no_load):
  extra = _fill(extra, tmp_path)
  parser = add_sweep_arguments(cli._Parser(prog="lusd-jax sweep"))
  argv = ["--example", "cat", "--grid", "lr=0.5,1", "--model", "tiny-random", "--size", "64"]
  argv += ["--out", str(tmp_path / "o"), *extra]
  assert sweep_command(parser.parse_args(argv)) == 2
  line = _error_line(capsys)
  for word in words:
    assert word in line, line


def test_convert_out_that_is_a_file_fails_before_loading(tmp_path, capsys, no_load):
  (tmp_path / "file").write_text("x")
  assert cli.main(["convert", "tiny-random", str(tmp_path / "file")]) == 2
  assert "OUT" in _error_line(capsys)


def test_model_head_reads_no_weights(tmp_path):
  head = loading.load_model_head("tiny-random")
  assert head.is_random and head.schedule.num_train_timesteps == 1000
  assert head.tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]
  with pytest.raises(loading.ModelLoadError, match="no_model"):
    loading.load_model_head(str(tmp_path / "no_model"))
  # A diffusers folder whose weights are missing still gives its head.
  (tmp_path / "sd" / "scheduler").mkdir(parents=True)
  (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 500}')
  from lusd_jax import tokenizer as tokenizer_lib

  tokenizer_lib.write_tokenizer_files(tmp_path / "sd" / "tokenizer")
  head = loading.load_model_head(str(tmp_path / "sd"))
  assert head.schedule.num_train_timesteps == 500 and not head.is_random
  with pytest.raises(io.InputError, match="t_max must be <= the model's 500"):
    pipeline.check_edit(head.tokenizer, head.schedule, "a cat", "a dog", [0], LUSDConfig(t_max=600))


@pytest.mark.parametrize(
  "seeds, match",
  [
    ([-1], r"seeds: seed -1"),
    ([2**32], "outside"),
    ([0, 0], "repeated"),
    ([], "at least one"),
    ([1.5], "integers"),
  ],
)
def test_api_checks_seeds(seeds, match):
  head = loading.load_model_head("tiny-random")
  with pytest.raises(io.InputError, match=match):
    pipeline.check_edit(head.tokenizer, head.schedule, "a cat", "a dog", seeds, LUSDConfig())


def test_api_refuses_prompts_that_tokenize_identically():
  head = loading.load_model_head("tiny-random")
  with pytest.raises(io.InputError, match="nothing to edit"):
    pipeline.check_edit(
      head.tokenizer, head.schedule, "A photo of a Cat.", "a photo  of a cat .", [0], LUSDConfig()
    )
  seeds, tokens = pipeline.check_edit(
    head.tokenizer, head.schedule, "a cat", "a dog", [np.int64(3)], LUSDConfig()
  )
  assert seeds == (3,) and type(seeds[0]) is int and tokens.positions == (2,)


@pytest.mark.parametrize(
  "field, value", [("t_max", 5000), ("edit_token_rule", "x"), ("output_rounding", "floor")]
)
def test_config_rejects_out_of_range_values(field, value):
  with pytest.raises(config_lib.ConfigError) as e:
    LUSDConfig(**{field: value})
  assert e.value.field == field and str(e.value).startswith(f"LUSDConfig.{field} ")


def test_official_preset_records_its_token_rule_and_rounding():
  cfg = LUSDConfig.official()
  assert cfg.edit_token_rule == "official" and cfg.output_rounding == "truncate"
  assert LUSDConfig().edit_token_rule == "paper" and LUSDConfig().output_rounding == "round"


def test_flag_names():
  assert cli.flag_name("t_max") == "--t-max" and cli.flag_name("seeds") == "--seeds"
  assert cli.flag_name("source_prompt") == "--source" and cli.flag_name("edit_words") == "--edit-words"
  parser = cli.build_parser()
  flags = {o for a in parser._subparsers._group_actions[0].choices["edit"]._actions for o in a.option_strings}
  for f in ("t_max", "lr", "reg_scale", "seeds", "edit_words", "source_prompt", "target_prompt"):
    assert cli.flag_name(f) in flags, f


def _batch_folder(tmp_path, rows, extra_columns=()):
  import csv

  from PIL import Image

  d = tmp_path / "in"
  (d / "images").mkdir(parents=True)
  Image.new("RGB", (64, 64), (200, 100, 50)).save(d / "images" / "x.png")
  with open(d / "index.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["img_path", "source_prompt", "target_prompt", *extra_columns])
    w.writerows(rows)
  return d


def test_batch_rows_with_bad_inputs_fail_before_loading(tmp_path, capsys, no_load):
  rows = [
    ("x.png", "a cat", "A  Cat", ""),  # CLIP sees the same prompt twice
    ("x.png", "a cat", "a dog", "unicorn"),  # an edit word that is not in the target
    ("missing.png", "a cat", "a dog", ""),
  ]
  d = _batch_folder(tmp_path, rows, ["edit_words"])
  argv = ["batch", "--input-dir", str(d), "--output-dir", str(tmp_path / "o"), "--model", "tiny-random"]
  assert cli.main([*argv, "--size", "64", "--quiet"]) == 1  # every row failed, nothing was loaded
  out, err = capsys.readouterr()
  assert "0 edited, 0 already done, 3 failed" in out
  assert "[row 0] failed: source_prompt 'a cat' and target_prompt 'A  Cat'" in err
  assert "[row 1] failed: edit_words" in err and "unicorn" in err
  assert "[row 2] failed: image not found" in err


@pytest.mark.parametrize(
  "extra, words",
  [
    (["--t-max", "5000"], ["--t-max"]),
    (["--seeds", "-2"], ["--seeds"]),
    (["--output-dir", "{file}"], ["--output-dir", "is a file"]),
    (["--output-dir", "{ro}/sub"], ["--output-dir", "cannot write"]),
  ],
)
def test_batch_rejects_bad_flags_before_loading(extra, words, tmp_path, capsys, no_load):
  d = _batch_folder(tmp_path, [("x.png", "a cat", "a dog")])
  argv = ["batch", "--input-dir", str(d), "--output-dir", str(tmp_path / "o"), "--model", "tiny-random"]
  argv += _fill(extra, tmp_path)
  assert cli.main(argv) == 2
  line = _error_line(capsys)
  for word in words:
    assert word in line, line
