"""LUSD edit speed: U-Net forward, compile, per-step time, rejections, memory, edits/s, MFU.

Prints numbers; never a test. Each (config, seeds) measurement runs in a fresh worker process, so
compile times start cold (from an empty temporary compilation cache) and peak memory is that of one
measurement; a second worker re-opens the same cache to time a warm start. The PyTorch reference
(diffusers `UNet2DConditionModel`, SDPA attention, `torch.inference_mode`, same shapes) runs in the
first worker of each config, timed in turn with the JAX programs so that both see the same load
(on a shared machine, separate runs minutes apart are not comparable).

What is measured vs extrapolated: the LUSD loop (`core.run_steps`, the real compiled program:
filtered resampling, attention maps, mask, update) runs `--steps` steps; a 300-step edit is
extrapolated from their mean time (steps differ only in how many draws the filter rejects).
Edits/s = seeds / (300 x time per step).

  python benchmarks/benchmark.py                      # CPU default: tiny, sd15-256 (affordable)
  python benchmarks/benchmark.py --configs tiny sd15-256 sd15-512 --seeds 1 8 --torch-reference
  python benchmarks/benchmark.py --configs sd15-512 --dtype bfloat16 --steps 20   # on a GPU

Results replace this platform's section of `--out` (benchmarks/RESULTS.md); the other platform's
section is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
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
TARGET_CPU = "CPU: LUSD time per step <= PyTorch diffusers U-Net forward (SDPA), same shapes"


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


def _unet_dict(which: str) -> dict:
  from lusd_jax.tiny import TINY_SD1_UNET

  if which == "tiny":
    return dict(TINY_SD1_UNET)
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
  """(static, dynamic) keyword arguments of `core.run_steps`, always passed the same way: the
  persistent cache key depends on the call's pytree structure, keywords included."""
  import jax

  from lusd_jax.lusd import core

  numeric = s["lusd"].numeric()
  state_S = jax.block_until_ready(core.init_state(s["inputs"], s["keys_S"], numeric))
  statics = dict(unet_fn=s["unet_fn"], static=s["lusd"].static(), schedule=s["schedule"], num=steps)
  dynamic = dict(params=s["params"], inputs=s["inputs"], state_S=state_S, k0=0, numeric=numeric)
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
  )
  return run, info


def worker_measure(
  cfg: BenchConfig,
  dtype_name: str,
  attention: str,
  *,
  seeds: int,
  steps: int,
  repeats: int,
  forward: bool,
  torch: bool,
) -> dict:
  """Compiles and times, in one process, what is asked of one (config, seeds).

  forward: the U-Net forward at batch 2 (compile time, XLA FLOPs, time).
  steps > 0: the real LUSD program (`core.run_steps`) for `steps` steps of `seeds` vmapped seeds.
  torch: the diffusers forward on the same shapes.

  Every timed function runs once untimed, then `repeats` rounds time each of them in turn, so that
  JAX and PyTorch see the same machine load (the minimum over rounds is reported). Peak memory is
  taken before PyTorch is loaded.
  """
  import jax
  import numpy as np

  from lusd_jax.lusd import core

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
    lowered = core.run_steps.lower(**dynamic, **statics)
    out["trace_s"] = time.perf_counter() - t0
    compiled_steps = lowered.compile()
    out["compile_s"] = time.perf_counter() - t0
    timers["step_chunk"] = lambda: step_out.append(jax.block_until_ready(compiled_steps(**dynamic)))
  for fn in timers.values():
    fn()  # untimed warm-up: the first execution allocates
  out["peak_mib"], out["mem_kind"] = _peak_memory_mib(jax.devices()[0])
  if torch:
    timers["torch_forward"], info = _torch_forward(cfg, dtype_name)
    out.update(info)
    timers["torch_forward"]()
  times = {name: [] for name in timers}
  for _ in range(repeats):
    for name, fn in timers.items():
      times[name] += _timed(fn, 1)
  for name, ts in times.items():
    out[f"{name}_times"] = ts
    out[f"{name}_s"] = min(ts)
  if steps:
    _, stats = step_out[-1]
    rejections_SN = np.asarray(stats.rejections)
    calls_N = rejections_SN.max(axis=0) + 1  # the vmapped while loop runs until every seed accepts
    out.update(
      steps_measured=steps,
      step_s=out["step_chunk_s"] / steps,
      rejections_per_step=float(rejections_SN.mean()),
      unet_calls_per_step=float(calls_N.mean()),
      hit_max_attempts=int(np.asarray(stats.hit_max_attempts).sum()),
    )
  return out


def worker_warm_compile(cfg: BenchConfig, dtype_name: str, attention: str, seeds: int, steps: int) -> dict:
  """A second process: time from start of tracing to a runnable `run_steps` (from the cache)."""
  import jax

  from lusd_jax.lusd import core

  hits = []
  jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
  )
  statics, dynamic = _steps_args(_setup(cfg, dtype_name, attention, seeds), steps)
  hits.clear()  # count the hits of run_steps only
  t0 = time.perf_counter()
  core.run_steps.lower(**dynamic, **statics).compile()
  return dict(warm_compile_s=time.perf_counter() - t0, cache_hits=len(hits))


# One attention layer of SD1.5 (batch 2, 8 heads): (label, query tokens, key tokens, head dim).
ATTENTION_LAYERS = (
  ("64x64 self (512 px)", 4096, 4096, 40),
  ("64x64 cross (512 px)", 4096, 77, 40),
  ("32x32 self (256 px)", 1024, 1024, 40),
  ("16x16 self (256 px)", 256, 256, 80),
)


def worker_attention(dtype_name: str, impls: list[str], repeats: int, torch: bool) -> dict:
  """`dot_product_attention` per implementation on SD1.5's layer shapes, and torch SDPA, in turn."""
  import functools

  import jax
  import jax.numpy as jnp

  from lusd_jax.compiler import jit
  from lusd_jax.models import attention

  if torch:
    import torch as th

    cuda = th.cuda.is_available()
    if not cuda:
      th.set_num_threads(os.cpu_count() or 1)
    th_dtype = {"float32": th.float32, "bfloat16": th.bfloat16, "float16": th.float16}[dtype_name]
    sync = th.cuda.synchronize if cuda else (lambda: None)
  out = {}
  for label, t, s, h in ATTENTION_LAYERS:
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (
      jax.random.normal(kk, (2, n, 8, h), jnp.float32).astype(dtype_name)
      for kk, n in zip(ks, (t, s, s), strict=True)
    )
    timers, row = {}, {}
    for impl in impls:
      try:
        fn = jit(functools.partial(attention.dot_product_attention, impl=impl)).lower(q, k, v).compile()
        timers[impl] = lambda fn=fn, qkv=(q, k, v): fn(*qkv).block_until_ready()
        timers[impl]()
      except Exception as e:  # noqa: BLE001 - e.g. cuDNN rejecting a head dim: report, go on
        row[impl] = f"failed: {type(e).__name__}"
    if torch:
      dev = "cuda" if cuda else "cpu"
      tq = th.randn(2, 8, t, h, device=dev, dtype=th_dtype)
      tk, tv = (th.randn(2, 8, s, h, device=dev, dtype=th_dtype) for _ in range(2))

      def sdpa(tq=tq, tk=tk, tv=tv):
        with th.inference_mode():
          th.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        sync()

      timers["torch SDPA"] = sdpa
      sdpa()
    times = {name: [] for name in timers}
    for _ in range(repeats):
      for name, fn in timers.items():
        times[name] += _timed(fn, 1)
    row.update({name: min(ts) for name, ts in times.items()})
    row["auto resolves to"] = attention.resolve_impl(q, k)
    out[label] = row
  return out


def _worker_main(spec: dict) -> None:
  from lusd_jax.compilation_cache import enable_compilation_cache

  if spec.get("cache_dir"):
    enable_compilation_cache(spec["cache_dir"])
  kind = spec["kind"]
  if kind == "info":
    out = worker_info()
  elif kind == "attention":
    out = worker_attention(spec["dtype"], spec["impls"], spec["repeats"], spec["torch"])
  else:
    cfg = CONFIGS[spec["config"]]
    if kind == "measure":
      out = worker_measure(
        cfg, spec["dtype"], spec["attention"], seeds=spec["seeds"], steps=spec["steps"],
        repeats=spec["repeats"], forward=spec["forward"], torch=spec["torch"],
      )  # fmt: skip
    elif kind == "warm":
      out = worker_warm_compile(cfg, spec["dtype"], spec["attention"], spec["seeds"], spec["steps"])
    else:
      raise ValueError(f"unknown worker kind {kind!r}")
  print("RESULT " + json.dumps(out), flush=True)


def _spawn(spec: dict, timeout: float) -> dict:
  """Runs one measurement in a fresh interpreter; returns its dict, or {"error": ...}."""
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      out = json.loads(line[len("RESULT ") :])
      out["process_s"] = time.perf_counter() - t0
      return out
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


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
    # Rounds after one untimed warm-up of every timed function (the minimum is reported).
    repeats = args.repeats or (3 if not heavy_cpu else 2 if cfg.latent == 32 else 1)
    rows.append(dict(config=name, steps=steps, seeds=seeds, repeats=repeats))
  return rows


def _fmt(x, unit="", digits=3):
  if x is None:
    return "—"
  if isinstance(x, float):
    if abs(x) >= 100:
      return f"{x:,.0f}{unit}"
    return f"{x:.{digits}g}{unit}"
  return f"{x}{unit}"


def run_benchmark(args) -> None:
  # The parent never initializes a JAX backend (on a GPU it would hold memory the workers need).
  info = _spawn(dict(kind="info"), args.timeout)
  if "error" in info:
    raise SystemExit(f"cannot start JAX: {info['error']}")
  plat, kind = info["platform"], info["device"]
  on_gpu = plat == "gpu"
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
  versions = _versions()
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = _load()
  print(f"device: {plat} ({kind}); dtype {dtype}; attention {args.attention}; load avg {load_start}")
  print(f"versions: {versions}")
  plan = _plan(args, on_gpu)
  layers = {}
  if args.attention_layers:
    impls = ["xla", "cudnn", "chunked"] if on_gpu else ["xla", "chunked"]
    spec = dict(kind="attention", dtype=dtype, impls=impls, repeats=3, torch=args.torch_reference)
    layers = _spawn(spec, args.timeout)
    layers.pop("process_s", None)
    print("\nattention layers (batch 2, 8 heads):", json.dumps(layers, indent=1))
  results = []
  for p in plan:
    cfg = CONFIGS[p["config"]]
    print(f"\n== {cfg.name}: SD U-Net '{cfg.unet}', latent {cfg.latent}x{cfg.latent} (image {cfg.image}px)")
    row = dict(config=cfg.name, latent=cfg.latent, dtype=dtype, attention=args.attention, seeds={})
    base = dict(config=cfg.name, dtype=dtype, attention=args.attention, repeats=p["repeats"])
    # The first measurement also times the forward (and PyTorch's); later ones only LUSD steps.
    for i, seeds in enumerate(p["seeds"] or [1]):
      steps = p["steps"] if p["seeds"] else 0
      first = i == 0
      with tempfile.TemporaryDirectory(prefix="lusd_bench_cache_") as cache:
        spec = dict(
          base, kind="measure", seeds=seeds, steps=steps, forward=first, torch=first and args.torch_reference,
          cache_dir=cache,
        )  # fmt: skip
        m = _spawn(spec, args.timeout)
        if steps and "error" not in m and args.cache_check:
          m.update(_spawn(dict(spec, kind="warm"), args.timeout))
      if first:
        row["forward"] = m
        print(
          f"  U-Net forward (batch 2): JAX {_fmt(m.get('forward_s'), ' s')} (compile "
          f"{_fmt(m.get('forward_compile_s'), ' s')}); PyTorch SDPA {_fmt(m.get('torch_forward_s'), ' s')}; "
          f"XLA {_fmt((m.get('forward_flops') or 0) / 2e9)} GFLOP/sample {m.get('error', '')}"
        )
      if steps:
        if "step_s" in m:
          m["edit_s"] = m["step_s"] * EDIT_STEPS
          m["edits_per_s"] = seeds / m["edit_s"]
        row["seeds"][seeds] = m
        print(
          f"  LUSD {seeds} seed(s): {_fmt(m.get('step_s'), ' s')}/step measured over {steps} step(s); "
          f"{EDIT_STEPS}-step edit {_fmt(m.get('edit_s'), ' s')} (extrapolated); compile "
          f"{_fmt(m.get('compile_s'), ' s')}; from cache {_fmt(m.get('warm_compile_s'), ' s')}; rejections/step "
          f"{_fmt(m.get('rejections_per_step'))}; peak {_fmt(m.get('peak_mib'), ' MiB')} {m.get('error', '')}"
        )
    results.append(row)
  finished = datetime.datetime.now(datetime.timezone.utc)
  env = dict(
    platform=plat,
    device=kind,
    cpu=_cpu_model(),
    cores=os.cpu_count(),
    memory=_memory_gib(),
    load_start=load_start,
    load_end=_load(),
    started=started.strftime("%Y-%m-%d %H:%M UTC"),
    minutes=(finished - started).total_seconds() / 60,
    versions=versions,
    compiler_options=info.get("compiler_options", {}),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    command="python benchmarks/benchmark.py " + " ".join(sys.argv[1:]),
  )
  section = render_section(env, results, on_gpu, layers)
  print("\n" + section)
  if args.out:
    write_results(args.out, "gpu" if on_gpu else "cpu", section)
    print(f"wrote the {'GPU' if on_gpu else 'CPU'} section of {args.out}")


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
    "One attention layer, `dot_product_attention` per implementation (batch 2, 8 heads, SD1.5 shapes):",
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


def render_section(env: dict, results: list[dict], on_gpu: bool, layers: dict | None = None) -> str:
  v = env["versions"]
  lines = [
    f"### {'GPU' if on_gpu else 'CPU'}: {env['device']}",
    "",
    f"- Date: {env['started']} (run took {env['minutes']:.1f} min)",
    f"- Hardware: {env['cpu']}, {env['cores']} cores, {env['memory']} RAM"
    + (f"; accelerator {env['device']}" if on_gpu else "; no accelerator"),
    f"- Load average (1/5/15 min) at start {env['load_start']}, at end {env['load_end']} "
    "(the machine is shared: times are upper bounds)",
    f"- Versions: Python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, "
    f"optax {v['optax']}, numpy {v['numpy']}, torch {v['torch']}, diffusers {v['diffusers']}",
    f"- XLA: compiler options of `lusd_jax.compiler.jit` {_options_text(env.get('compiler_options'))}; "
    f"XLA_FLAGS {'`' + env['xla_flags'] + '`' if env.get('xla_flags') else 'unset'}",
    f"- Command: `{env['command']}`",
    "",
    *render_layers(layers or {}),
    "U-Net forward, batch 2 (one LUSD U-Net call), random weights, no attention capture; JAX and PyTorch "
    "timed in turn in one process (minimum over rounds); peak mem is the JAX process's, LUSD steps included "
    "when they ran in it:",
    "",
    "| config | latent | dtype | attention | JAX forward | JAX compile | PyTorch SDPA forward | JAX / PyTorch "
    "| XLA GFLOP/sample | forward MFU | peak mem |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    f = r["forward"]
    if "error" in f:
      lines.append(f"| {r['config']} | {r['latent']}x{r['latent']} | {r['dtype']} | {r['attention']} "
                   f"| failed: {f['error']} | | | | | | |")  # fmt: skip
      continue
    flops, torch_s = f.get("forward_flops"), f.get("torch_forward_s")
    ratio = f["forward_s"] / torch_s if torch_s else None
    peak = _peak_tflops(env["device"], r["dtype"]) if on_gpu else None
    mfu = _mfu(flops, 1, 1, f.get("forward_s"), peak)
    lines.append(
      f"| {r['config']} | {r['latent']}x{r['latent']} | {r['dtype']} | {r['attention']} "
      f"| {_fmt(f.get('forward_s'), ' s')} | {_fmt(f.get('forward_compile_s'), ' s')} "
      f"| {_fmt(torch_s, ' s') if torch_s else 'not run'} | {_fmt(ratio, 'x')} "
      f"| {_fmt(flops / 2e9 if flops else None)} "
      f"| {_fmt(mfu * 100 if mfu else None, '%') if on_gpu else 'n/a (CPU)'} | {_fmt(f.get('peak_mib'), ' MiB')} |"
    )
  lines += [
    "",
    f"LUSD steps (`core.run_steps`, the compiled scan: filtered resampling, maps, mask, update); "
    f"a {EDIT_STEPS}-step edit is extrapolated from the measured steps:",
    "",
    "| config | seeds | steps measured | time / step | U-Net calls / step | rejections / step "
    f"| {EDIT_STEPS}-step edit (extrap.) | edits/s | compile (cold) | compile (2nd process, cache) "
    "| step / PyTorch forward | MFU | peak mem |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    torch_s = r["forward"].get("torch_forward_s")
    if not r["seeds"]:
      lines.append(
        f"| {r['config']} | — | not measured (forward only by default on CPU; `--sd15-512-steps`) "
        "| | | | | | | | | | |"
      )
    for seeds, s in r["seeds"].items():
      if "error" in s:
        lines.append(f"| {r['config']} | {seeds} | failed: {s['error']} | | | | | | | | | | |")
        continue
      ratio = s["step_s"] / torch_s if torch_s and seeds == 1 else None
      peak = _peak_tflops(env["device"], r["dtype"]) if on_gpu else None
      mfu = _mfu(r["forward"].get("forward_flops"), s["unet_calls_per_step"], seeds, s["step_s"], peak)
      warm = s.get("warm_compile_s")
      warm_txt = _fmt(warm, " s") + ("" if s.get("cache_hits") else " (no cache hit)") if warm else "—"
      lines.append(
        f"| {r['config']} | {seeds} | {s['steps_measured']} | {_fmt(s['step_s'], ' s')} "
        f"| {_fmt(s['unet_calls_per_step'])} | {_fmt(s['rejections_per_step'])} | {_fmt(s['edit_s'], ' s')} "
        f"| {_fmt(s['edits_per_s'])} | {_fmt(s['compile_s'], ' s')} | {warm_txt} | {_fmt(ratio, 'x')} "
        f"| {_fmt(mfu * 100 if mfu else None, '%') if on_gpu else 'n/a (CPU)'} | {_fmt(s['peak_mib'], ' MiB')} |"
      )
  mem_kind = next((r["forward"].get("mem_kind") for r in results if "mem_kind" in r["forward"]), "")
  lines += [
    "",
    f"Peak memory: {mem_kind or 'n/a'}, in the measuring process.",
    f"Targets: {TARGETS_GPU if on_gpu else TARGET_CPU}.",
  ]
  return "\n".join(lines)


_BEGIN, _END = "<!-- lusd-bench:{}:begin -->", "<!-- lusd-bench:{}:end -->"
NOT_MEASURED = {
  "gpu": "### GPU\n\nNot measured in this session (no GPU lent). Run `python benchmarks/benchmark.py "
  "--configs tiny sd15-256 sd15-512 --seeds 1 8 --torch-reference` on a GPU machine; it replaces "
  "this section.",
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
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="params and activations (auto: bfloat16 on GPU, float32 on CPU)")  # fmt: skip
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
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (min is reported)")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per measuring process")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md"), help="'' to not write")
  parser.add_argument("--_worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:
    _worker_main(json.loads(args._worker))
    return
  run_benchmark(args)


if __name__ == "__main__":
  main()
