"""LUSD edit speed: U-Net forward, compile, per-step time, rejections, memory, edits/s, MFU.

Prints numbers; never a test. Each (config, dtype, seeds) measurement runs in a fresh JAX worker
process, so compile times start cold (from an empty temporary compilation cache) and peak memory is
that of one measurement; a second worker re-opens the same cache to time a warm start (first seeds
count of each config and dtype only).

PyTorch never runs in a JAX process. The reference (diffusers `UNet2DConditionModel`, SDPA attention,
`torch.inference_mode`, batch 2, same shapes) runs in a PyTorch-only worker that never imports jax,
beside the JAX worker (which never imports torch). Both set up one after the other, then time in
alternating rounds (torch, jax, torch, jax, ...): while one times, the other waits idle on its stdin,
so neither framework's thread pool competes with the other's (in one process on the 2-core machine,
PyTorch's SD1.5 forward at 512 took 27.8 s; diffusers alone there takes 11-14 s, per issue 18).
Every time reported is the median over the rounds. The PyTorch worker waits passively between
OpenMP regions (OMP_WAIT_POLICY=PASSIVE unless set: spinning threads lose their core to other jobs
on a shared machine). The per-layer attention table is measured the same way (a JAX worker, a
PyTorch worker).

What is measured vs extrapolated: the LUSD loop (`core.run_steps`, the real compiled program:
filtered resampling, attention maps, mask, update) runs `--steps` steps; a 300-step edit is
extrapolated from their mean time (steps differ only in how many draws the filter rejects).
Edits/s = seeds / (300 x time per step).

  python benchmarks/benchmark.py                      # CPU default: tiny, sd15-256 (affordable)
  python benchmarks/benchmark.py --configs tiny sd15-256 sd15-512 --seeds 1 8 --torch-reference
  python benchmarks/benchmark.py --configs sd15-512 --dtype bfloat16 mixed-float16 --steps 20   # GPU

Results replace this platform's section of `--out` (benchmarks/RESULTS.md), rewritten after every
(config, dtype), so a run stopped early leaves what it measured; the other platform's section is
kept. `--json PATH --append` keeps the rows of earlier runs (benchmarks/gpu_check.sh runs it in steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

EDIT_STEPS = 300  # LUSD's default N (paper Sec. 4)
# The figure for one SD1.5 U-Net forward at 512x512 (64x64 latent), per sample.
SD15_512_TFLOP_PER_SAMPLE = 0.80
# Dense peak TFLOP/s by device kind (NVIDIA datasheets): (bf16/fp16 tensor core, tf32 tensor core).
PEAK_TFLOPS = {
  "H100": (989.0, 494.0),
  "H200": (989.0, 494.0),
  "A100": (312.0, 156.0),
}
TARGETS_GPU = "H100 bf16, SD1.5 at 512x512, 300 steps: 1 seed <= 3 s/edit; 8 seeds <= 15 s; compile <= 60 s; "
TARGETS_GPU += "cached start <= 10 s"
# Issue 18: a LUSD step (1 seed) <= 0.6x a diffusers SDPA forward at batch 2 timed alone, same shapes.
CPU_STEP_TARGET = 0.6
TARGET_CPU = (
  f"CPU: LUSD time per step (1 seed) <= {CPU_STEP_TARGET}x the PyTorch diffusers U-Net forward "
  "(SDPA, batch 2) "
  "timed alone in its own process, same machine, same shapes"
)
# Half-precision policies of `lusd_jax.loading`: only the U-Net runs here, so they time its dtype.
DTYPE_ALIASES = {"mixed-float16": "float16", "mixed-bfloat16": "bfloat16"}
# Pause between two workers' turns: lets the one that just timed park its threads (OpenMP and
# Eigen pools spin briefly after work) before the other starts its clock.
HANDOFF_PAUSE_S = 0.25


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  name: str
  unet: str  # "tiny" or "sd15": which config dict
  latent: int  # latent side (image side / 8)

  @property
  def image(self) -> int:
    return self.latent * 8


CONFIGS = {
  "tiny": BenchConfig("tiny", "tiny", 16),
  "sd15-256": BenchConfig("sd15-256", "sd15", 32),
  "sd15-512": BenchConfig("sd15-512", "sd15", 64),
}


def _tiny_unet_dict() -> dict:
  """`lusd_jax.tiny.TINY_SD1_UNET`, read from its file: importing the package would import jax, which
  the PyTorch worker must not (tiny.py holds plain dicts and imports nothing)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "_lusd_tiny_configs", os.path.join(REPO, "lusd_jax", "tiny.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(module.TINY_SD1_UNET)


def _unet_dict(which: str) -> dict:
  if which == "tiny":
    return _tiny_unet_dict()
  # SD1.5's U-Net architecture (stable-diffusion-v1-5 unet/config.json), random weights.
  return dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
  )


# ----------------------------------------------------------------------------- workers


def _reset_peak_memory() -> None:
  """Restarts the host peak-RSS counter (Linux: VmHWM), so the peak is that of what follows."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _peak_memory_mib(device) -> tuple[float, str]:
  """Peak memory: accelerator bytes in use, or the host peak RSS since `_reset_peak_memory`."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use (params included)"
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024, "host peak RSS while compiling and running (params included)"
  except OSError:
    pass
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host max RSS of the process"


def _random_params(config, dtype):
  """`unet.init_params` (numpy draws leaf by leaf: the peak memory is the params themselves)."""
  from lusd_jax.models import unet

  return unet.init_params(config, 0, dtype)


def _timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _setup(cfg: BenchConfig, dtype_name: str, attention: str, seeds: int):
  import jax
  import jax.numpy as jnp

  from lusd_jax import schedule as schedule_lib
  from lusd_jax.lusd import core
  from lusd_jax.lusd.config import LUSDConfig
  from lusd_jax.models import unet

  config = unet.UNetConfig.from_dict(_unet_dict(cfg.unet))
  dtype = jnp.dtype(dtype_name)
  params = _random_params(config, dtype)
  unet_fn = core.FlaxUNet(config, dtype_name, attention)
  k = jax.random.split(jax.random.key(1), 3)
  h = cfg.latent
  d = config.cross_attention_dim
  edit_mask = jnp.zeros((77,), jnp.float32).at[5].set(1.0)
  inputs = core.EditInputs(
    z_src=jax.random.normal(k[0], (h, h, 4), jnp.float32),
    ctx_src=jax.random.normal(k[1], (77, d), jnp.float32).astype(dtype),
    ctx_tgt=jax.random.normal(k[2], (77, d), jnp.float32).astype(dtype),
    edit_mask=edit_mask,
  )
  lusd = LUSDConfig(num_steps=EDIT_STEPS)
  keys_S = jax.vmap(jax.random.key)(jnp.arange(seeds))
  return dict(
    config=config,
    params=params,
    unet_fn=unet_fn,
    inputs=inputs,
    lusd=lusd,
    keys_S=keys_S,
    schedule=schedule_lib.Schedule(),
  )


def _forward_fn(s: dict, cfg: BenchConfig):
  """(jitted U-Net forward at batch 2 without capture, its arguments)."""
  import jax
  import jax.numpy as jnp

  from lusd_jax.compiler import jit

  unet_fn = s["unet_fn"]
  x_BHWC = jax.random.normal(jax.random.key(2), (2, cfg.latent, cfg.latent, 4), jnp.float32)
  t_B = jnp.array([500, 500], jnp.int32)
  ctx_BLD = jax.random.normal(jax.random.key(3), (2, 77, s["config"].cross_attention_dim), jnp.float32)
  fwd = jit(lambda p, x, t, c: unet_fn(p, x, t, c, None)[0])
  return fwd, (s["params"], x_BHWC, t_B, ctx_BLD)


def _xla_flops(s: dict, cfg: BenchConfig) -> float | None:
  """FLOPs of the forward from XLA's cost model, with plain XLA attention: a chunked or cuDNN layer
  hides its FLOPs in a loop or custom call that the cost model counts once or not at all."""
  try:
    xla = dict(s, unet_fn=dataclasses.replace(s["unet_fn"], attention_impl="xla"))
    fwd, fwd_args = _forward_fn(xla, cfg)
    return float(fwd.lower(*fwd_args).cost_analysis()["flops"])
  except Exception:  # noqa: BLE001 - a cost model is optional
    return None


def _steps_args(s: dict, steps: int):
  """(static, dynamic) keyword arguments of `engine.run_chunk` for the LUSD method, as `core.run_steps`
  passes them (the seeds are the batch), always passed the same way: the persistent cache key depends
  on the call's pytree structure, keywords included. Lowered with `.lower`, which `run_steps` (a plain
  function around it) does not have."""
  import jax

  from lusd_jax import sharding
  from lusd_jax.lusd import core

  numeric = s["lusd"].numeric()
  seeds = s["keys_S"].shape[0]
  state_S = jax.block_until_ready(core.init_state(s["inputs"], s["keys_S"], numeric))
  method = core.LUSD(s["unet_fn"], s["lusd"].static(), s["schedule"])
  statics = dict(method=method, num=steps)
  dynamic = dict(
    params=s["params"],
    inputs_B=sharding.broadcast_batch(s["inputs"], seeds),
    state_B=state_S,
    k0=0,
    numeric_B=sharding.broadcast_batch(numeric, seeds),
  )
  return statics, dynamic


def _torch_forward(cfg: BenchConfig, dtype_name: str):
  """A runnable diffusers UNet2DConditionModel forward (SDPA attention, batch 2, inference mode)."""
  import torch
  from diffusers import UNet2DConditionModel

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
  if not cuda:
    torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  model = UNet2DConditionModel(**_unet_dict(cfg.unet)).to(device=device, dtype=dtype).eval()
  h = cfg.latent
  x = torch.randn(2, 4, h, h, device=device, dtype=dtype)
  t = torch.tensor([500, 500], device=device)
  ctx = torch.randn(2, 77, model.config.cross_attention_dim, device=device, dtype=dtype)
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def run():
    with torch.inference_mode():
      model(x, t, encoder_hidden_states=ctx, return_dict=False)
    sync()

  info = dict(
    torch_processors=sorted({type(p).__name__ for p in model.attn_processors.values()}),
    torch_threads=torch.get_num_threads(),
    torch_device=torch.cuda.get_device_name() if cuda else "cpu",
    torch_omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
  )
  return run, info


def worker_torch_forward(cfg: BenchConfig, dtype_name: str):
  """The PyTorch worker's setup: (info, {"torch_forward": run}), the forward run once untimed."""
  t0 = time.perf_counter()
  run, info = _torch_forward(cfg, dtype_name)
  run()  # untimed warm-up: the first execution allocates (and, on CUDA, loads kernels)
  info["torch_setup_s"] = time.perf_counter() - t0
  return info, {"torch_forward": run}


def worker_measure(
  cfg: BenchConfig, dtype_name: str, attention: str, *, seeds: int, steps: int, forward: bool
):
  """Compiles, in this JAX process, what is asked of one (config, dtype, seeds); returns its timers.

  forward: the U-Net forward at batch 2 (compile time, XLA FLOPs, time).
  steps > 0: the real LUSD program (`core.run_steps`) for `steps` steps of `seeds` vmapped seeds.

  Every timer runs once untimed here; `_serve` times the rounds. Peak memory is taken after that
  warm-up (compilation and one execution of each program).

  Returns:
    (out, timers, finish): the setup's numbers, {name: fn} to time, and a function of no arguments
    returning the step statistics of the last chunk (rejections, U-Net calls) once timing is done.
  """
  import jax
  import numpy as np

  from lusd_jax import engine

  s = _setup(cfg, dtype_name, attention, seeds)
  out, timers = {}, {}
  _reset_peak_memory()
  if forward:
    fwd, fwd_args = _forward_fn(s, cfg)
    t0 = time.perf_counter()
    compiled_fwd = fwd.lower(*fwd_args).compile()
    out["forward_compile_s"] = time.perf_counter() - t0
    out["forward_flops"] = _xla_flops(s, cfg)
    timers["forward"] = lambda: compiled_fwd(*fwd_args).block_until_ready()
  step_out = []
  if steps:
    statics, dynamic = _steps_args(s, steps)
    t0 = time.perf_counter()
    lowered = engine.run_chunk.lower(**dynamic, **statics)
    out["trace_s"] = time.perf_counter() - t0
    compiled_steps = lowered.compile()
    out["compile_s"] = time.perf_counter() - t0
    timers["step_chunk"] = lambda: step_out.append(jax.block_until_ready(compiled_steps(**dynamic)))
  for fn in timers.values():
    fn()  # untimed warm-up: the first execution allocates
  out["peak_mib"], out["mem_kind"] = _peak_memory_mib(jax.devices()[0])

  def finish() -> dict:
    if not steps:
      return {}
    _, stats = step_out[-1]
    rejections_SN = np.asarray(stats.rejections)
    calls_N = rejections_SN.max(axis=0) + 1  # the vmapped while loop runs until every seed accepts
    return dict(
      steps_measured=steps,
      rejections_per_step=float(rejections_SN.mean()),
      unet_calls_per_step=float(calls_N.mean()),
      hit_max_attempts=int(np.asarray(stats.hit_max_attempts).sum()),
    )

  return out, timers, finish


def worker_warm_compile(cfg: BenchConfig, dtype_name: str, attention: str, seeds: int, steps: int) -> dict:
  """A second process: time from start of tracing to a runnable `run_steps` (from the cache)."""
  import jax

  from lusd_jax import engine

  hits = []
  jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
  )
  statics, dynamic = _steps_args(_setup(cfg, dtype_name, attention, seeds), steps)
  hits.clear()  # count the hits of run_steps only
  t0 = time.perf_counter()
  engine.run_chunk.lower(**dynamic, **statics).compile()
  return dict(warm_compile_s=time.perf_counter() - t0, cache_hits=len(hits))


# One attention layer of SD1.5 (batch 2, 8 heads): (label, query tokens, key tokens, head dim).
ATTENTION_LAYERS = (
  ("64x64 self (512 px)", 4096, 4096, 40),
  ("64x64 cross (512 px)", 4096, 77, 40),
  ("32x32 self (256 px)", 1024, 1024, 40),
  ("16x16 self (256 px)", 256, 256, 80),
)
TORCH_SDPA = "torch SDPA"


def worker_attention(dtype_name: str, impls: list[str]):
  """`dot_product_attention` per implementation on SD1.5's layer shapes (JAX worker).

  Returns:
    (out, timers): out["rows"][label] holds "auto resolves to" and the implementations that failed
    to compile; timers are named "label|impl".
  """
  import functools

  import jax
  import jax.numpy as jnp

  from lusd_jax.compiler import jit
  from lusd_jax.models import attention

  rows, timers = {}, {}
  for label, t, s, h in ATTENTION_LAYERS:
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (
      jax.random.normal(kk, (2, n, 8, h), jnp.float32).astype(dtype_name)
      for kk, n in zip(ks, (t, s, s), strict=True)
    )
    row = rows[label] = {"auto resolves to": attention.resolve_impl(q, k)}
    for impl in impls:
      try:
        fn = jit(functools.partial(attention.dot_product_attention, impl=impl)).lower(q, k, v).compile()
        timer = lambda fn=fn, qkv=(q, k, v): fn(*qkv).block_until_ready()
        timer()  # untimed warm-up
        timers[f"{label}|{impl}"] = timer
      except Exception as e:  # noqa: BLE001 - e.g. cuDNN rejecting a head dim: report, go on
        row[impl] = f"failed: {type(e).__name__}"
  return dict(rows=rows), timers


def worker_torch_attention(dtype_name: str):
  """torch SDPA on the same layer shapes (PyTorch worker); timers named "label|torch SDPA"."""
  import torch as th

  cuda = th.cuda.is_available()
  if not cuda:
    th.set_num_threads(os.cpu_count() or 1)
  th_dtype = {"float32": th.float32, "bfloat16": th.bfloat16, "float16": th.float16}[dtype_name]
  sync = th.cuda.synchronize if cuda else (lambda: None)
  dev = "cuda" if cuda else "cpu"
  timers = {}
  for label, t, s, h in ATTENTION_LAYERS:
    tq = th.randn(2, 8, t, h, device=dev, dtype=th_dtype)
    tk, tv = (th.randn(2, 8, s, h, device=dev, dtype=th_dtype) for _ in range(2))

    def sdpa(tq=tq, tk=tk, tv=tv):
      with th.inference_mode():
        th.nn.functional.scaled_dot_product_attention(tq, tk, tv)
      sync()

    sdpa()  # untimed warm-up
    timers[f"{label}|{TORCH_SDPA}"] = sdpa
  return dict(torch_threads=th.get_num_threads()), timers


# ----------------------------------------------------------------------------- worker protocol
#
# A timing worker sets up (compiles, warms up), prints "READY {json}", then answers each "ROUND"
# line on its stdin by timing every timer once ("TIMES {json}"), and "DONE" by printing
# "RESULT {json}" (medians over the rounds) and exiting. The parent starts the workers one after
# the other and sends the rounds to one worker at a time, so no two frameworks ever run at once.


def _serve(out: dict, timers: dict, finish=None, rounds: int | None = None) -> None:
  """The worker side of the protocol; with `rounds`, times that many rounds without waiting for stdin
  (a worker run by hand)."""
  print("READY " + json.dumps(out), flush=True)
  times = {name: [] for name in timers}

  def one_round():
    for name, fn in timers.items():
      times[name] += _timed(fn, 1)
    print("TIMES " + json.dumps({name: ts[-1] for name, ts in times.items()}), flush=True)

  if rounds is not None:
    for _ in range(rounds):
      one_round()
  else:
    for line in sys.stdin:
      if line.strip() == "ROUND":
        one_round()
      elif line.strip() == "DONE":
        break
  for name, ts in times.items():
    out[f"{name}_times"] = ts
    out[f"{name}_s"] = statistics.median(ts) if ts else None
  if finish is not None:
    out.update(finish())
  # Proof of separation, reported with the numbers: a JAX worker must not have imported torch, nor
  # a PyTorch worker jax.
  out["imported"] = sorted(m for m in ("jax", "torch") if m in sys.modules)
  out["pid"] = os.getpid()
  print("RESULT " + json.dumps(out), flush=True)


def _worker_main(spec: dict) -> None:
  kind = spec["kind"]
  rounds = None if spec.get("serve") else spec.get("repeats", 1)
  if kind == "torch_forward":
    out, timers = worker_torch_forward(CONFIGS[spec["config"]], spec["dtype"])
    _serve(out, timers, rounds=rounds)
    return
  if kind == "torch_attention":
    out, timers = worker_torch_attention(spec["dtype"])
    _serve(out, timers, rounds=rounds)
    return

  from lusd_jax.compilation_cache import enable_compilation_cache

  if spec.get("cache_dir"):
    enable_compilation_cache(spec["cache_dir"])
  if kind == "info":
    out = worker_info()
  elif kind == "attention":
    out, timers = worker_attention(spec["dtype"], spec["impls"])
    _serve(out, timers, rounds=rounds)
    return
  elif kind == "measure":
    cfg = CONFIGS[spec["config"]]
    out, timers, finish = worker_measure(
      cfg, spec["dtype"], spec["attention"], seeds=spec["seeds"], steps=spec["steps"], forward=spec["forward"]
    )
    _serve(out, timers, finish, rounds=rounds)
    return
  elif kind == "warm":
    cfg = CONFIGS[spec["config"]]
    out = worker_warm_compile(cfg, spec["dtype"], spec["attention"], spec["seeds"], spec["steps"])
  else:
    raise ValueError(f"unknown worker kind {kind!r}")
  print("RESULT " + json.dumps(out), flush=True)


def _worker_cmd(spec: dict) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]


def _spawn(spec: dict, timeout: float) -> dict:
  """Runs one one-shot worker (info, warm) in a fresh interpreter; returns its dict, or {"error": ...}."""
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(_worker_cmd(spec), capture_output=True, text=True, timeout=timeout, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      out = json.loads(line[len("RESULT ") :])
      out["process_s"] = time.perf_counter() - t0
      return out
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


class WorkerError(RuntimeError):
  pass


class _Worker:
  """The parent's handle on one timing worker: a process, its stdout lines in a queue (a reader
  thread, so that waits can time out), its stderr in a temporary file (read on failure)."""

  def __init__(self, spec: dict):
    self.t0 = time.perf_counter()
    self.stderr = tempfile.TemporaryFile(mode="w+")
    env = None
    if spec["kind"].startswith("torch"):
      # libgomp threads spin-wait between parallel regions by default; on a shared machine any other
      # process then preempts them and every region waits a time slice (2 cores, load 4-5 from other
      # jobs: diffusers' sd15-256 forward 10.7 s by default, 5.0 s passive). Passive waiting gives
      # PyTorch its best time on such a machine; an OMP_WAIT_POLICY set by the caller is kept.
      env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    self.proc = subprocess.Popen(
      _worker_cmd(dict(spec, serve=True)),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.stderr,
      text=True,
      cwd=REPO,
      env=env,
    )
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def expect(self, tag: str, timeout: float) -> dict:
    """The payload of the next line tagged `tag`; raises WorkerError if the worker dies or is late."""
    deadline = time.perf_counter() + timeout
    while True:
      try:
        line = self.lines.get(timeout=max(0.0, deadline - time.perf_counter()))
      except queue.Empty:
        self.close()
        raise WorkerError(f"timed out after {timeout:.0f} s") from None
      if line is None:
        code = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read().strip().splitlines()[-3:]
        raise WorkerError(f"exit {code}: " + " | ".join(tail))
      if line.startswith(tag + " "):
        return json.loads(line[len(tag) + 1 :])

  def send(self, command: str) -> None:
    try:
      self.proc.stdin.write(command + "\n")
      self.proc.stdin.flush()
    except OSError as e:  # a dead worker: `expect` reports its exit
      self.stderr.write(f"\n{e}")

  def close(self, grace: float = 0.0) -> None:
    """Ends the worker: waits `grace` seconds for it to exit by itself, then kills it (on a GPU, the
    next worker must not start while this one still holds its preallocated memory)."""
    try:
      self.proc.stdin.close()  # a worker waiting for a command then finishes and exits
    except OSError:
      pass
    try:
      self.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self.stderr.close()


def _alternate(specs: dict[str, dict], rounds: int, timeout: float) -> dict[str, dict]:
  """Sets up each worker of `specs` alone, in order, then times `rounds` rounds, one worker at a time
  in that order (e.g. torch, jax, torch, jax, ...); returns each worker's result (medians over the
  rounds), or {"error": ...} for a worker that failed. `timeout` bounds each setup and each round.
  """
  workers, results = {}, {}
  try:
    for name, spec in specs.items():
      w = _Worker(spec)
      try:
        results[name] = w.expect("READY", timeout)
        workers[name] = w
      except WorkerError as e:
        results[name] = {"error": str(e)}
        w.close()
    for _ in range(rounds):
      for name, w in list(workers.items()):
        time.sleep(HANDOFF_PAUSE_S)
        w.send("ROUND")
        try:
          w.expect("TIMES", timeout)
        except WorkerError as e:
          results[name] = {"error": f"while timing: {e}"}
          workers.pop(name).close()
    for name, w in workers.items():
      w.send("DONE")
      try:
        results[name] = w.expect("RESULT", timeout)
        results[name]["process_s"] = time.perf_counter() - w.t0
      except WorkerError as e:
        results[name] = {"error": str(e)}
  finally:
    for w in workers.values():
      w.close(grace=30.0)
  return results


# ----------------------------------------------------------------------------- environment


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def _memory_gib() -> str:
  try:
    with open("/proc/meminfo") as f:
      kib = int(f.readline().split()[1])
    return f"{kib / 2**20:.0f} GiB"
  except (OSError, ValueError, IndexError):
    return "unknown"


def _load() -> str:
  try:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def _versions() -> dict:
  import importlib.metadata as md

  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def worker_info() -> dict:
  import jax

  from lusd_jax import compiler

  d = jax.devices()[0]
  device = d.device_kind if d.platform != "cpu" else _cpu_model()
  return dict(platform=d.platform, device=device, compiler_options=compiler.COMPILER_OPTIONS)


def _peak_tflops(kind: str, dtype: str) -> float | None:
  for name, (half, tf32) in PEAK_TFLOPS.items():
    if name in kind:
      return half if dtype in ("bfloat16", "float16") else tf32
  return None


# ----------------------------------------------------------------------------- planning


def _plan(args, on_gpu: bool) -> list[dict]:
  """Which measurements run: on CPU, SD1.5 configs get few steps and one seed unless asked."""
  rows = []
  for name in args.configs:
    cfg = CONFIGS[name]
    heavy_cpu = not on_gpu and cfg.unet == "sd15"
    if args.steps is not None:
      steps = args.steps
    else:
      steps = 20 if on_gpu or cfg.unet == "tiny" else {32: 2, 64: 1}[cfg.latent]
    seeds = list(args.seeds)
    if heavy_cpu and not args.all_seeds:
      seeds = [s for s in seeds if s == 1] or seeds[:1]
    if heavy_cpu and cfg.latent == 64 and not args.sd15_512_steps:
      seeds = []  # forward only: one LUSD step at 64x64 costs minutes on a small CPU
    # Timed rounds after one untimed warm-up of every timer (the median is reported).
    repeats = args.repeats or 3
    rows.append(dict(config=name, steps=steps, seeds=seeds, repeats=repeats))
  return rows


def _dtypes(args, on_gpu: bool) -> list[str]:
  """The U-Net dtypes to time, in order, aliases resolved, each once."""
  out = []
  for d in args.dtype:
    d = ("bfloat16" if on_gpu else "float32") if d == "auto" else DTYPE_ALIASES.get(d, d)
    if d not in out:
      out.append(d)
  return out


def _fmt(x, unit="", digits=3):
  if x is None:
    return "—"
  if isinstance(x, float):
    if abs(x) >= 100:
      return f"{x:,.0f}{unit}"
    return f"{x:.{digits}g}{unit}"
  return f"{x}{unit}"


def _merge_torch(m: dict, t: dict) -> None:
  """Adds the PyTorch worker's forward (or its error) to the JAX measurement `m`."""
  if "error" in t:
    m["torch_error"] = t["error"]
    return
  keys = ("torch_forward_s", "torch_forward_times", "torch_processors", "torch_threads", "torch_device")
  for k in (*keys, "torch_omp_wait_policy"):
    m[k] = t.get(k)
  m["torch_setup_s"], m["torch_imported"], m["torch_pid"] = (
    t.get("torch_setup_s"),
    t.get("imported"),
    t.get("pid"),
  )


def _measure_attention_layers(dtype: str, on_gpu: bool, torch: bool, timeout: float) -> dict:
  """The per-layer table: a JAX worker and (with `torch`) a PyTorch worker, alternating rounds."""
  impls = ["xla", "cudnn", "chunked"] if on_gpu else ["xla", "chunked"]
  specs = {}
  if torch:
    specs["torch"] = dict(kind="torch_attention", dtype=dtype)
  specs["jax"] = dict(kind="attention", dtype=dtype, impls=impls)
  got = _alternate(specs, 3, timeout)
  if "error" in got["jax"]:
    return {"error": _cell(got["jax"]["error"])}
  layers = {}
  for label, row in got["jax"]["rows"].items():
    layers[label] = {}
    for impl in impls:
      layers[label][impl] = row.get(impl, got["jax"].get(f"{label}|{impl}_s"))
    if torch:
      t = got["torch"]
      layers[label][TORCH_SDPA] = t.get(
        f"{label}|{TORCH_SDPA}_s", "failed: " + _cell(t.get("error", "?"), 60)
      )
    layers[label]["auto resolves to"] = row["auto resolves to"]
  layers["dtype"] = dtype
  return layers


def run_benchmark(args) -> None:
  # The parent never initializes a JAX backend (on a GPU it would hold memory the workers need).
  info = _spawn(dict(kind="info"), args.timeout)
  if "error" in info:
    raise SystemExit(f"cannot start JAX: {info['error']}")
  plat, kind = info["platform"], info["device"]
  on_gpu = plat == "gpu"
  dtypes = _dtypes(args, on_gpu)
  versions = _versions()
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = _load()
  command = "python benchmarks/benchmark.py " + " ".join(sys.argv[1:])
  print(
    f"device: {plat} ({kind}); dtypes {', '.join(dtypes)}; attention {args.attention}; load avg {load_start}"
  )
  print(f"versions: {versions}")
  print(
    "processes: JAX numbers from JAX-only workers (torch never imported); PyTorch numbers from "
    "PyTorch-only workers (jax never imported), alternating timed rounds with the JAX worker; medians"
  )
  plan = _plan(args, on_gpu)
  # --append: rows of earlier runs on this platform (recorded in --json), except those re-measured now.
  earlier = {}
  if args.append and args.json and os.path.exists(args.json):
    with open(args.json) as f:
      earlier = json.load(f)
    if earlier.get("env", {}).get("platform") != plat:
      earlier = {}
  now = {(p["config"], d) for p in plan for d in dtypes}
  kept = [r for r in earlier.get("results", []) if (r["config"], r["dtype"]) not in now]
  layers = earlier.get("layers", {})
  if args.attention_layers:
    layers = _measure_attention_layers(dtypes[0], on_gpu, args.torch_reference, args.timeout)
    print(f"\nattention layers ({dtypes[0]}, batch 2, 8 heads):", json.dumps(layers, indent=1), flush=True)
  results = []
  todo = len(plan) * len(dtypes)
  finished = [0]  # (config, dtype) rows complete

  def env_now() -> dict:
    now_t = datetime.datetime.now(datetime.timezone.utc)
    prev = earlier.get("env", {})
    return dict(
      platform=plat,
      device=kind,
      cpu=_cpu_model(),
      cores=os.cpu_count(),
      memory=_memory_gib(),
      load_start=prev.get("load_start", load_start),
      load_end=_load(),
      started=prev.get("started", started.strftime("%Y-%m-%d %H:%M UTC")),
      minutes=prev.get("minutes", 0.0) + (now_t - started).total_seconds() / 60,
      versions=versions,
      compiler_options=info.get("compiler_options", {}),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      command=prev.get("command", []) + [command],
      partial=None
      if finished[0] == todo
      else f"{finished[0]} of {todo} (config, dtype) pairs of the last command (the last row may be partial)",
    )

  def write(final: bool) -> str:
    env = env_now()
    section = render_section(env, kept + results, on_gpu, layers)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(env=env, results=kept + results, layers=layers), f, indent=1)
    if args.out:
      write_results(args.out, "gpu" if on_gpu else "cpu", section)
      if final:
        print(f"wrote the {'GPU' if on_gpu else 'CPU'} section of {args.out}")
    return section

  for p in plan:
    cfg = CONFIGS[p["config"]]
    for dtype in dtypes:
      print(
        f"\n== {cfg.name}: SD U-Net '{cfg.unet}', latent {cfg.latent}x{cfg.latent} "
        f"(image {cfg.image}px), {dtype}",
        flush=True,
      )
      row = dict(
        config=cfg.name, latent=cfg.latent, dtype=dtype, attention=args.attention, forward={}, seeds={}
      )
      results.append(row)
      _measure_row(args, cfg, p, row, on_progress=lambda: write(final=False))
      finished[0] += 1
      write(final=False)
  print("\n" + write(final=True))


def _measure_row(args, cfg: BenchConfig, p: dict, row: dict, on_progress) -> None:
  """Fills `row` (one config and dtype): the forward (with the PyTorch worker) and the LUSD steps per seeds
  count, calling `on_progress()` after each measurement (a run stopped later keeps what it measured)."""
  dtype = row["dtype"]
  base = dict(config=cfg.name, dtype=dtype, attention=args.attention)
  # The first measurement also times the forward (and PyTorch's); later ones only LUSD steps.
  for i, seeds in enumerate(p["seeds"] or [1]):
    steps = p["steps"] if p["seeds"] else 0
    first = i == 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lusd_bench_cache_") as cache:
      spec = dict(base, kind="measure", seeds=seeds, steps=steps, forward=first, cache_dir=cache)
      specs = {"jax": spec}
      if first and args.torch_reference:
        specs = {"torch": dict(kind="torch_forward", config=cfg.name, dtype=dtype), **specs}
      got = _alternate(specs, p["repeats"], args.timeout)
      m = got["jax"]
      if "torch" in got:
        _merge_torch(m, got["torch"])
      # The cached start of the first seeds count only: one program shows it, each costs a process.
      if first and steps and "error" not in m and args.cache_check:
        m.update(_spawn(dict(spec, kind="warm"), args.timeout))
    m["rounds"] = p["repeats"]
    if first:
      row["forward"] = m
      torch_txt = (
        _fmt(m.get("torch_forward_s"), " s") if "torch_forward_s" in m else m.get("torch_error", "not run")
      )
      print(
        f"  U-Net forward (batch 2): JAX {_fmt(m.get('forward_s'), ' s')} (compile "
        f"{_fmt(m.get('forward_compile_s'), ' s')}; JAX worker); PyTorch SDPA {torch_txt} (PyTorch worker, "
        f"alone); XLA {_fmt((m.get('forward_flops') or 0) / 2e9)} GFLOP/sample {m.get('error', '')}",
        flush=True,
      )
    if steps:
      if m.get("step_chunk_s"):
        m["step_s"] = m["step_chunk_s"] / steps
        m["edit_s"] = m["step_s"] * EDIT_STEPS
        m["edits_per_s"] = seeds / m["edit_s"]
      row["seeds"][str(seeds)] = m
      ratio = _step_ratio(row, seeds, m)
      print(
        f"  LUSD {seeds} seed(s): {_fmt(m.get('step_s'), ' s')}/step measured over {steps} step(s) "
        "(JAX worker); "
        f"{EDIT_STEPS}-step edit {_fmt(m.get('edit_s'), ' s')} (extrapolated); compile "
        f"{_fmt(m.get('compile_s'), ' s')}; from cache {_fmt(m.get('warm_compile_s'), ' s')}; "
        "rejections/step "
        f"{_fmt(m.get('rejections_per_step'))}; peak {_fmt(m.get('peak_mib'), ' MiB')}"
        + (f"; step / PyTorch forward (alone) {_fmt(ratio, 'x')}" if ratio else "")
        + f" {m.get('error', '')}  [{time.perf_counter() - t0:.0f} s]",
        flush=True,
      )
    on_progress()


def _step_ratio(row: dict, seeds: int, s: dict) -> float | None:
  """LUSD step (1 seed) / diffusers SDPA forward at batch 2 timed alone: the CPU target's ratio."""
  torch_s = row.get("forward", {}).get("torch_forward_s")
  if int(seeds) != 1 or not torch_s or not s.get("step_s"):
    return None
  return s["step_s"] / torch_s


# ----------------------------------------------------------------------------- report


def _mfu(flops_per_forward_batch2, calls_per_step, seeds, step_s, peak):
  if not (flops_per_forward_batch2 and peak and step_s):
    return None
  return flops_per_forward_batch2 * seeds * calls_per_step / step_s / (peak * 1e12)


def render_layers(layers: dict) -> list[str]:
  rows = {k: v for k, v in layers.items() if isinstance(v, dict)}
  if not rows:
    return [f"Attention layers: {layers.get('error', 'not measured')}", ""] if layers else []
  cols = [c for c in next(iter(rows.values())) if c != "auto resolves to"]
  lines = [
    "One attention layer, `dot_product_attention` per implementation "
    f"({layers.get('dtype', '')}, batch 2, 8 heads, SD1.5 shapes), in a JAX worker"
    f"{'; torch SDPA in a PyTorch worker, alternating rounds' if TORCH_SDPA in cols else ''}; "
    "medians:",
    "",
    "| layer | " + " | ".join(cols) + " | auto resolves to |",
    "|---|" + "---|" * (len(cols) + 1),
  ]
  for label, row in rows.items():
    cells = [_fmt(row.get(c), " s") if not isinstance(row.get(c), str) else row[c] for c in cols]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {row.get('auto resolves to', '—')} |")
  return lines + [""]


def _options_text(options: dict | None) -> str:
  if not options:
    return "none (XLA's defaults)"
  return ", ".join(f"`{k}={v}`" for k, v in options.items())


def _cell(text: str, limit: int = 120) -> str:
  """An error message fit for a markdown table cell (workers join stderr lines with ' | ')."""
  text = " ".join(str(text).replace("|", "/").split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _policy_lines(results: list[dict]) -> list[str]:
  """The PyTorch worker's OpenMP wait policy, and why it is passive by default."""
  policies = sorted({r["forward"].get("torch_omp_wait_policy") for r in results} - {None})
  if not policies:
    return []
  why = (
    " (passive by default: on a shared CPU, spinning libgomp threads lose their core to other jobs and "
    "every parallel region waits for them; diffusers' forward ran about 2x slower spinning)"
  )
  return [f"- PyTorch worker: OMP_WAIT_POLICY={', '.join(policies)}" + (why if "PASSIVE" in policies else "")]


def render_section(env: dict, results: list[dict], on_gpu: bool, layers: dict | None = None) -> str:
  v = env["versions"]
  commands = env["command"] if isinstance(env["command"], list) else [env["command"]]
  rounds = sorted({r["forward"].get("rounds") for r in results if r["forward"].get("rounds")})
  lines = [
    f"### {'GPU' if on_gpu else 'CPU'}: {env['device']}",
    "",
    *(
      [f"- **Partial**: {env['partial']} finished when this was written (stopped, or still running)"]
      if env.get("partial")
      else []
    ),  # fmt: skip
    f"- Date: {env['started']} (run took {env['minutes']:.1f} min)",
    f"- Hardware: {env['cpu']}, {env['cores']} cores, {env['memory']} RAM"
    + (f"; accelerator {env['device']}" if on_gpu else "; no accelerator"),
    f"- Load average (1/5/15 min) at start {env['load_start']}, at end {env['load_end']} "
    "(the machine is shared: times are upper bounds)",
    f"- Versions: Python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, "
    f"optax {v['optax']}, numpy {v['numpy']}, torch {v['torch']}, diffusers {v['diffusers']}",
    f"- XLA: compiler options of `lusd_jax.compiler.jit` {_options_text(env.get('compiler_options'))}; "
    f"XLA_FLAGS {'`' + env['xla_flags'] + '`' if env.get('xla_flags') else 'unset'}",
    "- Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands),
    "- Processes: every JAX number comes from a JAX-only worker process (torch never imported), every "
    "PyTorch number from a PyTorch-only worker (jax never imported). The two set up one after the other, "
    "then alternate timed rounds (torch, jax, torch, jax, ...), the other waiting idle, so each is timed "
    f"alone on the machine; each time is the median over the rounds ({'/'.join(map(str, rounds)) or '—'}).",
    *_policy_lines(results),
    "",
    *render_layers(layers or {}),
    "U-Net forward, batch 2 (one LUSD U-Net call), random weights, no attention capture. JAX forward, "
    "compile and peak mem: the JAX worker (peak mem includes the LUSD steps of the first seeds count, "
    "compiled in the same worker); PyTorch SDPA forward: the PyTorch worker, timed alone:",
    "",
    "| config | latent | dtype | attention | JAX forward | JAX compile | PyTorch SDPA forward (alone) "
    "| JAX / PyTorch | XLA GFLOP/sample | forward MFU | peak mem |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    f = r["forward"]
    torch_s = f.get("torch_forward_s")
    torch_txt = (
      _fmt(torch_s, " s")
      if torch_s
      else ("failed: " + _cell(f["torch_error"]) if f.get("torch_error") else "not run")
    )
    if "error" in f:
      lines.append(f"| {r['config']} | {r['latent']}x{r['latent']} | {r['dtype']} | {r['attention']} "
                   f"| failed: {_cell(f['error'])} | | {torch_txt} | | | | |")  # fmt: skip
      continue
    flops = f.get("forward_flops")
    ratio = f["forward_s"] / torch_s if torch_s and f.get("forward_s") else None
    peak = _peak_tflops(env["device"], r["dtype"]) if on_gpu else None
    mfu = _mfu(flops, 1, 1, f.get("forward_s"), peak)
    lines.append(
      f"| {r['config']} | {r['latent']}x{r['latent']} | {r['dtype']} | {r['attention']} "
      f"| {_fmt(f.get('forward_s'), ' s')} | {_fmt(f.get('forward_compile_s'), ' s')} "
      f"| {torch_txt} | {_fmt(ratio, 'x')} "
      f"| {_fmt(flops / 2e9 if flops else None)} "
      f"| {_fmt(mfu * 100 if mfu else None, '%') if on_gpu else 'n/a (CPU)'} | {_fmt(f.get('peak_mib'), ' MiB')} |"
    )
  lines += [
    "",
    f"LUSD steps (`core.run_steps`, the compiled scan: filtered resampling, maps, mask, update), each seeds "
    f"count in its own JAX worker; a {EDIT_STEPS}-step edit is extrapolated from the measured steps. "
    "step / PyTorch forward (alone): the LUSD step of 1 seed over the PyTorch worker's forward above "
    f"(CPU target <= {CPU_STEP_TARGET}x):",
    "",
    "| config | dtype | seeds | steps measured | time / step | U-Net calls / step | rejections / step "
    f"| {EDIT_STEPS}-step edit (extrap.) | edits/s | compile (cold) | compile (2nd process, cache) "
    "| step / PyTorch forward (alone) | MFU | peak mem |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  blank = " |" * 11
  for r in results:
    if not r["seeds"]:
      lines.append(
        f"| {r['config']} | {r['dtype']} | — "
        "| not measured (forward only by default on CPU; `--sd15-512-steps`) |" + blank
      )
    for seeds, s in r["seeds"].items():
      if "error" in s or not s.get("step_s"):
        lines.append(
          f"| {r['config']} | {r['dtype']} | {seeds} | failed: {_cell(s.get('error', 'no time'))} |" + blank
        )
        continue
      ratio = _step_ratio(r, seeds, s)
      peak = _peak_tflops(env["device"], r["dtype"]) if on_gpu else None
      mfu = _mfu(r["forward"].get("forward_flops"), s["unet_calls_per_step"], int(seeds), s["step_s"], peak)
      warm = s.get("warm_compile_s")
      warm_txt = _fmt(warm, " s") + ("" if s.get("cache_hits") else " (no cache hit)") if warm else "—"
      lines.append(
        f"| {r['config']} | {r['dtype']} | {seeds} | {s['steps_measured']} | {_fmt(s['step_s'], ' s')} "
        f"| {_fmt(s['unet_calls_per_step'])} | {_fmt(s['rejections_per_step'])} | {_fmt(s['edit_s'], ' s')} "
        f"| {_fmt(s['edits_per_s'])} | {_fmt(s['compile_s'], ' s')} | {warm_txt} | {_fmt(ratio, 'x')} "
        f"| {_fmt(mfu * 100 if mfu else None, '%') if on_gpu else 'n/a (CPU)'} | {_fmt(s['peak_mib'], ' MiB')} |"
      )
  mem_kind = next((r["forward"].get("mem_kind") for r in results if "mem_kind" in r["forward"]), "")
  lines += ["", f"Peak memory: {mem_kind or 'n/a'}, in the measuring JAX worker."]
  if on_gpu:
    lines.append(f"Targets: {TARGETS_GPU}.")
  else:
    verdicts = [
      f"{r['config']} {r['dtype']} {_fmt(ratio, 'x')} ({'met' if ratio <= CPU_STEP_TARGET else 'not met'})"
      for r in results
      for seeds, s in r["seeds"].items()
      if (ratio := _step_ratio(r, seeds, s)) is not None
    ]
    lines.append(
      f"Target: {TARGET_CPU}: "
      + ("; ".join(verdicts) if verdicts else "not measured (`--torch-reference`)")
      + "."
    )
  leaks = sorted(
    {
      r["config"]
      for r in results
      for m in (r["forward"], *r["seeds"].values())
      if "torch" in m.get("imported", [])
    }
    | {r["config"] for r in results if "jax" in (r["forward"].get("torch_imported") or [])}
  )
  if leaks:
    lines.append(f"**Warning**: a worker imported the other framework ({', '.join(leaks)}): not timed alone.")
  return "\n".join(lines)


_BEGIN, _END = "<!-- lusd-bench:{}:begin -->", "<!-- lusd-bench:{}:end -->"
NOT_MEASURED = {
  "gpu": "### GPU\n\nNot measured yet (no GPU lent). On a GPU machine, `bash benchmarks/gpu_check.sh` (or "
  "`python benchmarks/benchmark.py --configs sd15-512 sd15-256 --dtype bfloat16 mixed-float16 float32 "
  "--torch-reference`) replaces this section.",
  "cpu": "### CPU\n\nNot measured yet.",
}

HEADER = """# LUSD-JAX benchmark results

Written by `benchmarks/benchmark.py` (see `benchmarks/README.md`); each platform's section is replaced
by a run on that platform. Weights are random (SD1.5's architecture, not its checkpoint): speed does
not depend on them, but the number of filtered-resampling rejections does, so rejections / step
here do not predict those of a real edit.
"""


def write_results(path: str, which: str, section: str) -> None:
  """Replaces one platform's section of `path`, keeping the other (and creating the file)."""
  text = open(path).read() if os.path.exists(path) else HEADER
  for plat in ("cpu", "gpu"):
    if _BEGIN.format(plat) not in text:
      text = text.rstrip("\n") + f"\n\n{_BEGIN.format(plat)}\n{NOT_MEASURED[plat]}\n{_END.format(plat)}\n"
  pattern = re.compile(re.escape(_BEGIN.format(which)) + r".*?" + re.escape(_END.format(which)), re.S)
  text = pattern.sub(lambda _: f"{_BEGIN.format(which)}\n{section}\n{_END.format(which)}", text)
  with open(path, "w") as f:
    f.write(text)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", nargs="+", default=["tiny", "sd15-256"], choices=sorted(CONFIGS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[1, 8])
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="LUSD steps measured per run (default: 20 on GPU and for tiny; 2 for sd15-256 and 1 for "
    "sd15-512 on CPU); the 300-step edit is extrapolated",
  )
  parser.add_argument(
    "--dtype",
    nargs="+",
    default=["auto"],
    choices=["auto", "float32", "bfloat16", "float16", *DTYPE_ALIASES],
    help="U-Net params and activations, one row each (auto: bfloat16 on GPU, float32 on CPU; "
    "mixed-float16 / mixed-bfloat16 time their U-Net dtype: the VAE and text encoder play no part here)",
  )
  parser.add_argument(
    "--attention",
    default="auto",
    choices=["auto", "xla", "cudnn", "chunked", "reference"],
    help="dot_product_attention implementation of uncaptured layers",
  )
  parser.add_argument("--torch-reference", action="store_true", help="time diffusers' U-Net forward (SDPA)")
  parser.add_argument("--no-cache-check", dest="cache_check", action="store_false",
                      help="skip the second process that compiles from the persistent cache")  # fmt: skip
  parser.add_argument("--no-attention-layers", dest="attention_layers", action="store_false",
                      help="skip the per-layer attention timings")  # fmt: skip
  parser.add_argument("--all-seeds", action="store_true", help="on CPU, run every --seeds for SD1.5 too")
  parser.add_argument("--sd15-512-steps", action="store_true", help="on CPU, run LUSD steps at sd15-512")
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed rounds (default 3; the median is reported)"
  )
  parser.add_argument(
    "--timeout",
    type=float,
    default=3600,
    help="seconds per worker setup, per timed round, per one-shot process",
  )
  parser.add_argument(
    "--json", default="", help="also write every row (and the environment) to this JSON file"
  )
  parser.add_argument(
    "--append",
    action="store_true",
    help="keep the rows of --json from earlier runs on this platform (a re-measured config and dtype "
    "replaces its row; without --attention-layers measured, the earlier layer table is kept)",
  )
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md"), help="'' to not write")
  parser.add_argument("--_worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:
    _worker_main(json.loads(args._worker))
    return
  run_benchmark(args)


if __name__ == "__main__":
  main()
