"""`lusd-jax batch` resumes per seed and per row, from whatever a killed run left behind.

One full batch (2 rows x seeds 0 1, tiny random model, 64 px, 2 steps, snapshots) runs once per
module while a spy records the order in which files are written. A SIGKILL leaves a prefix of that
order (writes are atomic) and maybe one `.{name}.*.tmp`; each test copies the finished folder, cuts
it back to such a state and reruns `cli.main(["batch", ...])` in-process.
"""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lusd_jax import batchdir, cli, io, loading

SIZE = 64
SEEDS = (0, 1)
FAST = ["--model", "tiny-random", "--size", str(SIZE), "--num-steps", "2", "--save-step", "1", "--quiet"]
PER_ROW = 3 * len(SEEDS) + 2  # per seed: strip, image, record; then grid, run.json
PER_SEED_KEYS = ("rejections_per_step", "timestep_per_step", "total_rejections", "hit_max_attempts")


def _write_index(d):
  (d / "images").mkdir(parents=True)
  for name, seed in (("a.png", 0), ("b.png", 1)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / "images" / name)
  with open(d / "index.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["img_path", "source_prompt", "target_prompt"])
    w.writerows(
      [("a.png", "a photo of a cat", "a photo of a dog"), ("b.png", "a bowl of fruit", "a bowl of apples")]
    )
  return d


def _spy_writes(monkeypatch):
  """Records the name of every file `io._atomic_write` finishes, in order."""
  written, atomic_write = [], io._atomic_write

  def spy(path, write, binary):
    out = atomic_write(path, write, binary)
    written.append(out.name)
    return out

  monkeypatch.setattr(io, "_atomic_write", spy)
  return written


def _count_loads(monkeypatch):
  loads, load_model = [], loading.load_model

  def counted(*a, **k):
    loads.append(a)
    return load_model(*a, **k)

  monkeypatch.setattr(loading, "load_model", counted)
  return loads


def _batch(capsys, in_dir, out_dir, seeds=SEEDS):
  argv = [
    "batch",
    "--input-dir",
    str(in_dir),
    "--output-dir",
    str(out_dir),
    *FAST,
    "--seeds",
    *map(str, seeds),
  ]
  code = cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """(input folder, finished output folder, the names in the order they were written)."""
  root = tmp_path_factory.mktemp("full")
  in_dir, out_dir = _write_index(root / "in"), root / "out"
  argv = ["batch", "--input-dir", str(in_dir), "--output-dir", str(out_dir), *FAST, "--seeds", "0", "1"]
  with pytest.MonkeyPatch.context() as mp:
    order = _spy_writes(mp)
    assert cli.main(argv) == 0
  return in_dir, out_dir, tuple(order)


def _copy(full, tmp_path):
  out = tmp_path / "out"
  shutil.copytree(full[1], out)  # copy2: mtimes kept
  return out


def _stamp(path):
  return path.read_bytes(), path.stat().st_mtime_ns


def _record(out, name):
  return json.loads((out / name).read_text())


def _assert_row_complete(out, row, seeds):
  for s in seeds:
    for name in (
      batchdir.output_name(row, s),
      batchdir.seed_record_name(row, s),
      batchdir.snapshot_name(row, s),
    ):
      assert batchdir.is_done(out / name), name
  assert batchdir.is_done(out / batchdir.grid_name(row))
  record = _record(out, batchdir.run_record_name(row))
  assert record["seeds"] == list(seeds)
  assert [len(r) for r in record["rejections_per_step"]] == [2] * len(seeds)
  assert [len(t) for t in record["timestep_per_step"]] == [2] * len(seeds)
  assert len(record["hit_max_attempts"]) == len(record["total_rejections"]) == len(seeds)
  return record


def test_write_order_is_the_one_resume_relies_on(full):
  _, out, order = full
  assert len(order) == 2 * PER_ROW
  for row in (0, 1):
    names = order[row * PER_ROW : (row + 1) * PER_ROW]
    for s in SEEDS:  # a seed's record comes after its strip and image
      strip, image, rec = (
        names.index(f(row, s))
        for f in (batchdir.snapshot_name, batchdir.output_name, batchdir.seed_record_name)
      )
      assert strip < image < rec
    assert names[-2:] == (batchdir.grid_name(row), batchdir.run_record_name(row))
  assert not list(out.glob(".*"))


def test_seed_records_merge_into_the_row_record(full):
  out = full[1]
  for row in (0, 1):
    records = [_record(out, batchdir.seed_record_name(row, s)) for s in SEEDS]
    assert [r["seed"] for r in records] == list(SEEDS)
    mask = batchdir.array_from_json(records[0]["mask"])
    assert mask.dtype == np.float32 and mask.shape == (SIZE // 8, SIZE // 8)
    np.testing.assert_array_equal(batchdir.array_from_json(batchdir.array_to_json(mask)), mask)
    assert batchdir.merge_seed_records(records) == _record(out, batchdir.run_record_name(row))
    row_record = _record(out, batchdir.run_record_name(row))
    assert batchdir.merge_seed_records(batchdir.split_run_record(row_record)) == row_record


@pytest.mark.slow
@pytest.mark.parametrize("k", range(1, PER_ROW))
def test_rerun_after_a_kill_between_any_two_files_completes_the_row(full, tmp_path, capsys, monkeypatch, k):
  in_dir, _, order = full
  out = _copy(full, tmp_path)
  # Row 0 is complete; row 1 was killed after its first k files, while writing file k.
  kept, lost = order[: PER_ROW + k], order[PER_ROW + k :]
  for name in lost:
    (out / name).unlink()
  (out / f".{lost[0]}.k1l2m3n4.tmp").write_bytes(b"")
  (out / ".notes.tmp").write_text("not ours")
  finished = [s for s in SEEDS if batchdir.seed_record_name(1, s) in kept]
  before = {
    name: _stamp(out / name)
    for s in finished
    for name in (batchdir.output_name(1, s), batchdir.snapshot_name(1, s), batchdir.seed_record_name(1, s))
  }
  before.update({name: _stamp(out / name) for name in order[:PER_ROW]})
  loads = _count_loads(monkeypatch)

  code, stdout, err = _batch(capsys, in_dir, out)
  assert code == 0, err
  assert "batch: 1 edited, 1 already done, 0 failed (of 2 rows)" in stdout
  assert len(loads) == (0 if len(finished) == len(SEEDS) else 1)  # only rebuilding: no model
  assert sorted(p.name for p in out.iterdir()) == sorted([*order, ".notes.tmp"])  # the .tmp is gone
  for name, stamp in before.items():
    assert _stamp(out / name) == stamp, name
  record = _assert_row_complete(out, 1, SEEDS)
  original = _record(full[1], batchdir.run_record_name(1))
  for key in PER_SEED_KEYS:  # finished seeds read back, the others computed again: nothing lost
    assert record[key] == original[key], key
  if not loads:  # the grid and record rebuilt from disk alone equal the originals
    assert record == original
    assert (out / batchdir.grid_name(1)).read_bytes() == (full[1] / batchdir.grid_name(1)).read_bytes()


def test_more_seeds_on_a_rerun_computes_only_the_new_one(full, tmp_path, capsys, monkeypatch):
  in_dir, _, order = full
  out = _copy(full, tmp_path)
  before = {name: _stamp(out / name) for name in order if "_seed" in name}
  written = _spy_writes(monkeypatch)

  code, stdout, err = _batch(capsys, in_dir, out, seeds=(0, 1, 2))
  assert code == 0, err
  assert "batch: 2 edited, 0 already done, 0 failed (of 2 rows)" in stdout
  assert written == [
    name
    for row in (0, 1)
    for name in (
      batchdir.snapshot_name(row, 2),
      batchdir.output_name(row, 2),
      batchdir.seed_record_name(row, 2),
      batchdir.grid_name(row),
      batchdir.run_record_name(row),
    )
  ]
  for name, stamp in before.items():
    assert _stamp(out / name) == stamp, name
  for row in (0, 1):
    record = _assert_row_complete(out, row, (0, 1, 2))
    original = _record(full[1], batchdir.run_record_name(row))
    for key in PER_SEED_KEYS:
      assert record[key][:2] == original[key], key
    grid = Image.open(out / batchdir.grid_name(row))
    assert grid.width > Image.open(full[1] / batchdir.grid_name(row)).width  # one more tile


def test_rerun_with_every_row_done_loads_no_model(full, tmp_path, capsys, monkeypatch):
  in_dir, _, order = full
  out = _copy(full, tmp_path)
  (out / f".{batchdir.grid_name(0)}.abcd1234.tmp").write_bytes(b"")
  (out / "keep.tmp").write_text("not ours")
  before = {name: _stamp(out / name) for name in order}

  def no_load(*a, **k):
    pytest.fail("the model was loaded although every row is done")

  monkeypatch.setattr(loading, "load_model", no_load)
  code, stdout, err = _batch(capsys, in_dir, out)
  assert code == 0, err
  assert "batch: 0 edited, 2 already done, 0 failed (of 2 rows)" in stdout
  assert sorted(p.name for p in out.iterdir()) == sorted([*order, "keep.tmp"])
  assert {name: _stamp(out / name) for name in order} == before
  # A subset of the seeds is done too.
  code, stdout, _ = _batch(capsys, in_dir, out, seeds=(1,))
  assert code == 0 and "batch: 0 edited, 2 already done" in stdout


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_output_dir_that_cannot_be_a_folder_is_one_error_before_loading(
  full, tmp_path, capsys, monkeypatch, where
):
  (tmp_path / "file").write_text("x")
  loads = _count_loads(monkeypatch)
  code, _, err = _batch(capsys, full[0], tmp_path / where)
  assert code == 2
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith("error: --output-dir: ") and "file" in lines[0], err
  assert not loads
