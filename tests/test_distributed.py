"""`lusd-jax batch --distributed`: two real processes joined by JAX's runtime (CPU, gloo collectives).

The two-process run uses test_batch.py's folder and flags (3 rows x seeds 0 1, tiny random model, 64
px, 3 steps), so its single-process reference here reuses that test's compiled programs (the
persistent cache of conftest.py) and process 0 reads them from the cache too. Process 1 always
compiles: JAX writes cache entries from process 0 only, and process 1's programs name its own
devices (ids from 2048), which is part of the cache key on CPU.

The 6 (row, seed) pairs split 3 / 3, so row 1 is split: process 0 computes its seed 0, process 1 its
seed 1, and process 0 writes its grid and run.json after the barrier.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lusd_jax import batchdir, cli, distributed
from lusd_jax.cli import edit as edit_cli
from lusd_jax.cli import sweep as sweep_cli
from tests import test_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1)

# Runs `lusd-jax` and lists, in argv[1], the files it wrote (every output goes through _atomic_write).
SPY = """
import json, sys
from lusd_jax import cli, io
written, real = [], io._atomic_write
def spy(path, write, binary):
  out = real(path, write, binary)
  written.append(out.name)
  return out
io._atomic_write = spy
try:
  code = cli.main(sys.argv[2:])
finally:
  with open(sys.argv[1], "w") as f:
    json.dump(written, f)
sys.exit(code)
"""


# ----------------------------------------------------------------------------- shares (no JAX)


@pytest.mark.parametrize("n, count", [(0, 1), (1, 3), (6, 2), (7, 3), (10, 4), (5, 5)])
def test_assign_gives_every_element_to_exactly_one_process(n, count):
  shares = [list(distributed.assign(n, p, count)) for p in range(count)]
  assert sorted(i for share in shares for i in share) == list(range(n))
  for p, share in enumerate(shares):
    assert share == list(range(share[0], share[0] + len(share))) if share else True  # contiguous
    assert all(distributed.owner(i, n, count) == p for i in share)
  sizes = [len(share) for share in shares]
  assert max(sizes) - min(sizes) <= 1
  # The same split on every call (a rerun gets its share back); bad arguments refused.
  assert shares == [list(distributed.assign(n, p, count)) for p in range(count)]
  with pytest.raises(ValueError):
    distributed.assign(n, count, count)


def test_row_shares_keep_a_rows_seeds_together():
  one, two = (edit_cli.row_shares(3, SEEDS, distributed.Process(p, 2)) for p in range(2))
  R = edit_cli.RowShare
  assert one == {0: R((0, 1), True, False), 1: R((0,), True, True)}
  assert two == {1: R((1,), False, True), 2: R((0, 1), True, False)}
  assert edit_cli.row_shares(3, SEEDS, distributed.Process(0, 1)) == {
    r: R(SEEDS, True, False) for r in range(3)
  }
  assert edit_cli._any_row_split(3, 2, 2) and not edit_cli._any_row_split(2, 2, 2)
  assert not edit_cli._any_row_split(3, 2, 1)


def test_stale_temp_files_of_another_process_are_kept(tmp_path):
  mine, theirs = tmp_path / ".000_seed0.png.ab12cd.tmp", tmp_path / ".001_seed1.png.ef34gh.tmp"
  for p in (mine, theirs):
    p.write_bytes(b"x")
  assert batchdir.remove_stale_temp_files(tmp_path, [batchdir.output_name(0, 0)]) == [mine]
  assert theirs.exists() and not mine.exists()
  assert batchdir.remove_stale_temp_files(tmp_path) == [theirs]


@pytest.mark.parametrize(
  "extra, words",
  [
    (["--process-id", "1"], ["--process-id", "needs --distributed"]),
    (["--coordinator", "h:1"], ["--coordinator", "needs --distributed"]),
    (
      ["--distributed", "--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"],
      ["--process-id 2"],
    ),
    (["--distributed", "--num-processes", "0"], ["--num-processes", ">= 1"]),
    (["--distributed", "--coordinator", "host0", "--num-processes", "2", "--process-id", "0"], ["HOST:PORT"]),
    (["--distributed", "--num-processes", "2"], ["--coordinator, --process-id", "together"]),
  ],
)
def test_bad_distributed_flags_are_one_line_before_anything_starts(
  extra, words, tmp_path, capsys, monkeypatch
):
  def never(*args, **kwargs):
    raise AssertionError("jax.distributed.initialize was called")

  monkeypatch.setattr(distributed, "initialize", never)
  in_dir = test_batch._write_index(tmp_path / "in")
  argv = [
    "batch",
    "--input-dir",
    str(in_dir),
    "--output-dir",
    str(tmp_path / "out"),
    "--model",
    "tiny-random",
  ]
  assert cli.main(argv + extra) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  for word in words:
    assert word in err
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- two processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _batch_argv(in_dir, out_dir):
  return ["batch", "--input-dir", str(in_dir), "--output-dir", str(out_dir), *test_batch.ARGS]


def _start_two(argv, logs):
  """Starts `lusd-jax ARGV --distributed` as processes 0 and 1 (`_finish` waits for them)."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  argv = [*argv, "--distributed", "--coordinator", f"localhost:{_free_port()}", "--num-processes", "2"]
  # Output to files, not pipes: a full pipe would block a process that the other waits for.
  files = [[open(f"{logs[p]}.{kind}", "w+") for kind in ("out", "err")] for p in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", SPY, str(logs[p]), *argv, "--process-id", str(p)],
      env=env,
      cwd=REPO,
      stdout=files[p][0],
      stderr=files[p][1],
      text=True,
    )  # fmt: skip
    for p in range(2)
  ]
  return procs, files


def _finish(procs, files):
  """Waits for `_start_two`'s processes (killed after 240 s); returns [(code, stdout, stderr)]."""
  try:
    for proc in procs:  # a hung coordinator must not hang the suite
      proc.wait(timeout=240)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  out = []
  for proc, streams in zip(procs, files, strict=True):
    for f in streams:
      f.seek(0)
    out.append((proc.returncode, streams[0].read(), streams[1].read()))
    for f in streams:
      f.close()
  for p, (code, stdout, stderr) in enumerate(out):
    assert code == 0, f"process {p} exited with {code}:\n{stdout}\n{stderr[-4000:]}"
  return out


@pytest.mark.slow
def test_two_processes_equal_one_and_write_each_file_once(tmp_path, capsys):
  in_dir = test_batch._write_index(tmp_path / "in")
  one, two = tmp_path / "one", tmp_path / "two"
  logs = [tmp_path / f"written{p}.json" for p in range(2)]
  started = _start_two(_batch_argv(in_dir, two), logs)
  # Meanwhile, one process in this one (test_batch.py's programs, from the cache): process 1 spends
  # most of its time compiling, on one core.
  try:
    code = cli.main(["batch", "--input-dir", str(in_dir), "--output-dir", str(one), *test_batch.ARGS])
  finally:
    runs = _finish(*started)
  assert code == 0
  capsys.readouterr()
  for p, (_, stdout, _) in enumerate(runs):
    assert f"batch: process {p} of 2: 3 of the 6 (row, seed) pairs" in stdout
    assert f"(process {p} of 2): 2 edited, 0 already done, 0 failed (of 2 rows)" in stdout
  assert "[row 1] every process's seeds are written" in runs[0][1]  # process 0 owns the split row

  # Every file once, each by one process: process 0 rows 0 and 1 (seed 0, grid, run.json), process
  # 1 row 1's seed 1 and row 2.
  written = [json.loads(log.read_text()) for log in logs]
  assert not set(written[0]) & set(written[1]) and all(len(w) == len(set(w)) for w in written)
  names = lambda r, seeds: [
    n for s in seeds for n in (batchdir.output_name(r, s), batchdir.seed_record_name(r, s))
  ]
  rows = lambda *rs: [n for r in rs for n in (batchdir.grid_name(r), batchdir.run_record_name(r))]
  assert sorted(written[0]) == sorted(names(0, SEEDS) + names(1, (0,)) + rows(0, 1))
  assert sorted(written[1]) == sorted(names(1, (1,)) + names(2, SEEDS) + rows(2))
  assert sorted(os.listdir(two)) == sorted(written[0] + written[1])

  for row in range(3):
    a = json.loads((two / batchdir.run_record_name(row)).read_text())
    b = json.loads((one / batchdir.run_record_name(row)).read_text())
    assert a["seeds"] == b["seeds"] == list(SEEDS)
    assert a["timestep_per_step"] == b["timestep_per_step"]
    assert a["rejections_per_step"] == b["rejections_per_step"]
    for name in [batchdir.output_name(row, s) for s in SEEDS] + [batchdir.grid_name(row)]:
      x, y = (np.asarray(Image.open(d / name), np.int16) for d in (two, one))
      # The same program and inputs; an element's batch position may differ (row 1 seed 1 runs
      # with row 2 in process 1): at most a rounding step of the 8-bit PNG.
      assert np.abs(x - y).max() <= 1, name
  x0, x2 = (np.asarray(Image.open(one / batchdir.output_name(r, 0)), np.int16) for r in (0, 2))
  assert np.abs(x0 - x2).max() > 1  # rows really differ

  # Resume, per process: row 2 (process 1's) lost its grid and run.json, the split row 1 its
  # run.json. Each process rebuilds only its own row from the files there, with no model loaded; the
  # other files stay untouched.
  for name in rows(2) + [batchdir.run_record_name(1)]:
    (two / name).unlink()
  stamps = {n: (two / n).stat().st_mtime_ns for n in os.listdir(two) if n not in rows(1)}
  runs = _finish(*_start_two(_batch_argv(in_dir, two), logs))
  for _, _, stderr in runs:
    assert "random weights" not in stderr  # the model was not loaded
  assert "(process 0 of 2): 0 edited, 2 already done" in runs[0][1]
  assert "[row 2] every seed is finished" in runs[1][1]
  written = [json.loads(log.read_text()) for log in logs]
  assert sorted(written[0]) == sorted(rows(1)) and sorted(written[1]) == sorted(rows(2))
  assert {n: (two / n).stat().st_mtime_ns for n in stamps} == stamps
  assert json.loads((two / batchdir.run_record_name(1)).read_text())["seeds"] == list(SEEDS)


# ----------------------------------------------------------------------------- sweep --distributed

# test_sweep.py's command-line flags (64 px, 3 steps, lr 1/64, decay 0.9) over 2 cells x 1 seed: a
# one-process batch of 2, as that file's 2-seed reference edits compile; each process runs 1 cell.
SWEEP_ARGS = ["--target", "a photo of a dog", "--source", "a photo of a cat", "--model", "tiny-random"]
SWEEP_ARGS += [
  "--size",
  "64",
  "--num-steps",
  "3",
  "--set",
  "lr=0.015625",
  "--set",
  "threshold-decay-rate=0.9",
]
SWEEP_ARGS += ["--grid", "threshold=0,0.1", "--seeds", "0", "--quiet"]
SWEEP_FILES = [
  "sweep_grid.png",
  "input.png",
  "sweep.json",
  "threshold=0_seed0.png",
  "threshold=0.1_seed0.png",
]


@pytest.mark.parametrize(
  "extra, words",
  [
    (["--process-id", "1"], ["--process-id", "needs --distributed"]),
    (["--distributed", "--coordinator", "h:1"], ["--num-processes, --process-id", "together"]),
  ],
)
def test_bad_sweep_distributed_flags_are_one_line_before_anything_starts(
  extra, words, tmp_path, capsys, monkeypatch
):
  monkeypatch.setattr(distributed, "initialize", lambda *a, **k: pytest.fail("initialize was called"))
  argv = ["sweep", str(tmp_path / "missing.png"), *SWEEP_ARGS, "--out", str(tmp_path / "out")]
  assert cli.main(argv + extra) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  for word in words:
    assert word in err  # (not the missing image: the flags are checked first)
  assert not (tmp_path / "out").exists()


def _without_timings(record: dict) -> dict:
  return {k: v for k, v in record.items() if k != "timings_s"}


@pytest.mark.slow
def test_sweep_shares_of_two_processes_equal_one_and_each_writes_its_part(tmp_path, capsys, monkeypatch):
  """`sweep --distributed` as process 1 and then process 0 of 2, both in this process.

  The real join and barrier are the two-process batch test's: JAX never serves process 1's programs
  from the compilation cache, so two more processes would add minutes for what that test shows
  already. Here `process_from_args` says which process this is (after the real flag checks) and the
  barrier only records that it was reached; running process 1 first makes its part exist when
  process 0 passes the barrier, as the real barrier guarantees.
  """
  image = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
  one, two = tmp_path / "one", tmp_path / "two"
  assert cli.main(["sweep", str(image), *SWEEP_ARGS, "--out", str(one)]) == 0

  def process(args):
    distributed.check_flags(args.distributed, args.coordinator, args.num_processes, args.process_id)
    return distributed.Process(args.process_id, args.num_processes)

  barriers = []
  monkeypatch.setattr(sweep_cli.args_lib, "process_from_args", process)
  monkeypatch.setattr(distributed, "barrier", barriers.append)
  argv = [
    "sweep",
    str(image),
    *SWEEP_ARGS,
    "--out",
    str(two),
    "--distributed",
    "--coordinator",
    "localhost:1",
  ]
  argv += ["--num-processes", "2", "--process-id"]
  parts = [sweep_cli.part_name(p) for p in range(2)]
  capsys.readouterr()
  assert cli.main([*argv, "1"]) == 0
  assert "sweep: process 1 of 2: 1 of the 2 cells" in capsys.readouterr().out
  assert os.listdir(two) == [parts[1]] and len(barriers) == 1  # its part, nothing else
  stamp = (two / parts[1]).stat().st_mtime_ns
  assert cli.main([*argv, "0"]) == 0
  assert "sweep: process 0 of 2: 1 of the 2 cells" in capsys.readouterr().out
  # Process 0 wrote its part and, after the barrier, the sweep's files laid out as one process's.
  assert len(barriers) == 2 and (two / parts[1]).stat().st_mtime_ns == stamp
  assert sorted(os.listdir(one)) == sorted(SWEEP_FILES)
  assert sorted(os.listdir(two)) == sorted(SWEEP_FILES + parts)
  a, b = (json.loads((d / "sweep.json").read_text()) for d in (two, one))
  assert _without_timings(a) == _without_timings(b)
  assert [cell["total_rejections"] for cell in a["cells"]] != [[0], [0]]  # threshold 0.1 redraws
  for name in SWEEP_FILES[:2] + SWEEP_FILES[3:]:
    x, y = (np.asarray(Image.open(d / name), np.int16) for d in (two, one))
    assert x.shape == y.shape and np.abs(x - y).max() <= 1, name  # a rounding step (batch 1 vs 2)

  # Resume per process: the parts are there, so neither process computes (nor loads the model);
  # process 0 writes the sweep's files again from them.
  monkeypatch.setattr(sweep_cli.args_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
  stamps = {p: (two / p).stat().st_mtime_ns for p in parts}
  (two / "sweep.json").unlink()
  for p in ("1", "0"):
    assert cli.main([*argv, p]) == 0
    assert "nothing to compute" in capsys.readouterr().out
  assert {p: (two / p).stat().st_mtime_ns for p in parts} == stamps
  assert _without_timings(json.loads((two / "sweep.json").read_text())) == _without_timings(a)


@pytest.mark.parametrize("error", [OSError("disk full"), RuntimeError("RESOURCE_EXHAUSTED: out of memory")])
def test_a_joined_process_that_crashes_ends_at_once(error, monkeypatch, capsys):
  """Any exception (not only a user mistake) ends a joined process at once, after its traceback: a
  normal exit would wait for the others at JAX's shutdown barrier while they wait for it."""
  ended = []
  monkeypatch.setattr(distributed, "_joined", True)
  monkeypatch.setattr(distributed, "end_on_error", ended.append)

  def command(args):
    raise error

  with pytest.raises(type(error)):
    cli.run_command(command, None)
  assert ended == [1] and str(error) in capsys.readouterr().err
  monkeypatch.setattr(distributed, "_joined", False)  # alone: the exception propagates, nothing ends
  ended.clear()
  with pytest.raises(type(error)):
    cli.run_command(command, None)
  assert ended == [] and capsys.readouterr().err == ""
