"""Inversion speed: null-text inversion and dual-branch CFG sampling on SD1.5's U-Net (random weights).

Prints numbers and writes this platform's part of the "## Inversion" section of `--out`
(benchmarks/RESULTS.md); never a test. Three measurements, each in a fresh worker process (cold
compile from an empty temporary compilation cache; the peak memory is that of one measurement):

- DDIM inversion (`inversion.DDIMInversion`, guidance 1, batch-1 U-Net call per step);
- null-text inversion (`inversion.NullTextOptimization`, w = 7.5): per outer step one conditional
  U-Net call, `--inner-steps` Adam steps (a U-Net forward and backward each) forced by epsilon = -1
  (no early stop), and one guided step (batch 2);
- dual-branch CFG sampling: one U-Net call on 4 rows per step, [null, P] x [source latent, target
  latent], and a DDIM step of each branch: UnifyEdit's denoising without its gradient.

The inversion phases run the real programs of `reconstruction.invert`: `engine.run_chunk` of the
N-step method (N = 50) for the first `--steps` steps. Every step costs the same (the timestep is
only a number; NTI's inner count is forced), so a 50-step run is extrapolated as 50 x the measured
time per step; the output says which numbers are measured and which extrapolated. With early
stopping, a real NTI takes fewer inner steps: the extrapolated 50 x 10 is its upper bound.

  python benchmarks/inversion.py                        # CPU: 256 px, 3 / 2 / 3 steps measured
  python benchmarks/inversion.py --size 512 --steps 50  # on a GPU (its defaults: 512 px, 50 steps)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.benchmark import (  # noqa: E402
  _cpu_model,
  _fmt,
  _load,
  _memory_gib,
  _peak_memory_mib,
  _random_params,
  _reset_peak_memory,
  _unet_dict,
  _versions,
)

FULL_STEPS = 50  # Prompt-to-Prompt's and UnifyEdit's DDIM steps
GUIDANCE = 7.5
PHASES = ("ddim", "nti", "dual")
LABELS = {
  "ddim": "DDIM inversion",
  "nti": "null-text inversion",
  "dual": "dual-branch CFG sampling",
}
# Measured steps per phase on CPU (one SD1.5 U-Net forward at 256 px takes seconds there).
CPU_STEPS = {"ddim": 3, "nti": 2, "dual": 3}


# ----------------------------------------------------------------------------- workers


def _setup(size: int, dtype_name: str, unet_name: str):
  import jax
  import jax.numpy as jnp

  from lusd_jax import schedule as schedule_lib
  from lusd_jax.lusd import core
  from lusd_jax.models import unet

  config = unet.UNetConfig.from_dict(_unet_dict(unet_name))
  params = _random_params(config, jnp.dtype(dtype_name))
  h, d = size // 8, config.cross_attention_dim
  k = jax.random.split(jax.random.key(0), 4)
  return dict(
    unet_fn=core.FlaxUNet(config, dtype_name),
    params=params,
    schedule=schedule_lib.Schedule(),
    z=jax.random.normal(k[0], (h, h, 4), jnp.float32),
    ctx=jax.random.normal(k[1], (77, d), jnp.float32),
    ctx_tgt=jax.random.normal(k[2], (77, d), jnp.float32),
    null=jax.random.normal(k[3], (77, d), jnp.float32),
  )


def _engine_phase(s: dict, phase: str, inner_steps: int):
  """(method, inputs_B, numeric_B) of one inversion phase on a batch of one, N = 50."""
  import jax
  import jax.numpy as jnp

  from lusd_jax import inversion

  one = lambda tree: jax.tree.map(lambda a: jnp.asarray(a)[None], tree)  # noqa: E731
  if phase == "ddim":
    method = inversion.DDIMInversion(s["unet_fn"], s["schedule"], FULL_STEPS)
    return method, one(inversion.InversionInputs(s["z"], s["ctx"])), ()
  # A trajectory of random latents: NTI's cost does not depend on their values (no early stop).
  traj = jax.random.normal(jax.random.key(5), (FULL_STEPS + 1,) + s["z"].shape, jnp.float32)
  method = inversion.NullTextOptimization(s["unet_fn"], s["schedule"], FULL_STEPS)
  numeric = inversion.NullTextNumeric.of(GUIDANCE, inner_steps, epsilon=-1.0)
  return method, one(inversion.NullTextInputs(traj, s["ctx"], s["null"])), one(numeric)


def _dual_branch_program():
  import functools

  import jax
  import jax.numpy as jnp

  from lusd_jax import schedule as schedule_lib
  from lusd_jax.compiler import jit

  @functools.partial(jit, static_argnames=("unet_fn", "schedule", "num"))
  def dual_branch(unet_fn, params, schedule, z_src, z_tgt, ctx_src, ctx_tgt, nulls, *, num: int):
    """`num` guided DDIM steps of both branches of a 50-step run, one 4-row U-Net call per step."""
    ts = jnp.asarray(schedule_lib.ddim_timesteps(schedule, FULL_STEPS))
    ratio = schedule_lib.ddim_step_ratio(schedule, FULL_STEPS)
    abar = schedule_lib.alphas_cumprod(schedule)

    def body(carry, k):
      zs, zt = carry
      t = ts[k]
      sample = jnp.stack([zs, zs, zt, zt])
      ctx = jnp.stack([nulls[k], ctx_src, nulls[k], ctx_tgt]).astype(jnp.float32)
      t_4 = jnp.full((4,), t, jnp.int32)
      out, _ = unet_fn(params, sample, t_4, ctx, None)
      eps = schedule_lib.eps_from_model_output(
        schedule.prediction_type, abar, sample, out.astype(jnp.float32), t_4
      )
      e_src = eps[0] + GUIDANCE * (eps[1] - eps[0])
      e_tgt = eps[2] + GUIDANCE * (eps[3] - eps[2])
      step = functools.partial(schedule_lib.ddim_step, schedule, t=t, t_prev=t - ratio)
      return (step(eps=e_src, x_t=zs), step(eps=e_tgt, x_t=zt)), None

    return jax.lax.scan(body, (z_src, z_tgt), jnp.arange(num, dtype=jnp.int32))[0]

  return dual_branch


def worker_measure(
  phase: str, size: int, dtype_name: str, steps: int, inner_steps: int, unet_name: str
) -> dict:
  """Compiles, then times one execution of `steps` steps of one phase (in this fresh process)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lusd_jax import engine

  s = _setup(size, dtype_name, unet_name)
  _reset_peak_memory()
  out = {}
  t0 = time.perf_counter()
  if phase == "dual":
    nulls = jnp.broadcast_to(s["null"], (FULL_STEPS,) + s["null"].shape)
    statics = dict(unet_fn=s["unet_fn"], schedule=s["schedule"], num=steps)
    dynamic = dict(
      params=s["params"],
      z_src=s["z"],
      z_tgt=0.9 * s["z"],
      ctx_src=s["ctx"],
      ctx_tgt=s["ctx_tgt"],
      nulls=nulls,
    )
    compiled = _dual_branch_program().lower(**dynamic, **statics).compile()
    out["compile_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = jax.block_until_ready(compiled(**dynamic))
    out["run_s"] = time.perf_counter() - t1
    out["finite"] = bool(all(np.isfinite(np.asarray(z)).all() for z in result))
  else:
    method, inputs_B, numeric_B = _engine_phase(s, phase, inner_steps)
    keys_B = jax.random.split(jax.random.key(0), 1)
    state_B = jax.block_until_ready(engine.init_batch(method, inputs_B, keys_B, numeric_B))
    statics = dict(method=method, num=steps, mesh=None)
    dynamic = dict(params=s["params"], inputs_B=inputs_B, state_B=state_B, k0=0, numeric_B=numeric_B)
    compiled = engine.run_chunk.lower(**dynamic, **statics).compile()
    out["compile_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    _, stats = jax.block_until_ready(compiled(**dynamic))
    out["run_s"] = time.perf_counter() - t1
    out["finite"] = bool(np.asarray(stats.finite).all())
    if phase == "nti":
      out["inner_steps"] = np.asarray(stats.inner_steps)[0].tolist()
  out["peak_mib"], out["mem_kind"] = _peak_memory_mib(jax.devices()[0])
  out.update(steps=steps, step_s=out["run_s"] / steps)
  return out


def worker_info() -> dict:
  import jax

  d = jax.devices()[0]
  return dict(platform=d.platform, device=d.device_kind if d.platform != "cpu" else _cpu_model())


def _worker_main(spec: dict) -> None:
  from lusd_jax.compilation_cache import enable_compilation_cache

  if spec.get("cache_dir"):
    enable_compilation_cache(spec["cache_dir"])
  if spec["kind"] == "info":
    out = worker_info()
  else:
    out = worker_measure(
      spec["phase"], spec["size"], spec["dtype"], spec["steps"], spec["inner_steps"], spec["unet"]
    )
  print("RESULT " + json.dumps(out), flush=True)


def _spawn(spec: dict, timeout: float, script: str | None = None) -> dict:
  """Runs one measurement in a fresh interpreter of `script` (default this one) with `--_worker spec`.

  Returns:
    The worker's RESULT dict plus `process_s`, or {"error": ...}.
  """
  cmd = [sys.executable, os.path.abspath(script or __file__), "--_worker", json.dumps(spec)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :]) | {"process_s": time.perf_counter() - t0}
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# ----------------------------------------------------------------------------- report


def _full_run(phase: str, m: dict, inner_steps: int) -> str:
  if "step_s" not in m:
    return "—"
  total = _fmt(FULL_STEPS * m["step_s"], " s")
  how = "measured" if m["steps"] >= FULL_STEPS else "extrapolated"
  what = f"{FULL_STEPS} x {inner_steps} inner" if phase == "nti" else f"{FULL_STEPS} steps"
  return f"{total} ({what}, {how})"


def header_lines(env: dict) -> list[str]:
  """The platform heading and the run's bullet list (date, hardware, load, versions, command)."""
  on_gpu = env["platform"] == "gpu"
  v = env["versions"]
  return [
    f"### {'GPU' if on_gpu else 'CPU'}: {env['device']}",
    "",
    f"- Date: {env['started']} (run took {env['minutes']:.1f} min)",
    f"- Hardware: {env['cpu']}, {env['cores']} cores, {env['memory']} RAM"
    + (f"; accelerator {env['device']}" if on_gpu else "; no accelerator"),
    f"- Load average (1/5/15 min) at start {env['load_start']}, at end {env['load_end']} "
    "(the machine is shared: times are upper bounds)",
    f"- Versions: Python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, "
    f"optax {v['optax']}",
    f"- Command: `{env['command']}`",
  ]


def render(env: dict, rows: dict, inner_steps: int) -> str:
  lines = header_lines(env) + [
    "",
    f"{'SD1.5' if env['unet'] == 'sd15' else 'The tiny'} U-Net architecture, random weights, "
    f"{env['size']} px ({env['size'] // 8}x{env['size'] // 8} latent), {env['dtype']}, one image. Each row "
    "is one fresh process: compile (cold, empty cache), "
    "then one timed execution of the measured steps (its first, so allocation included).",
    "",
    "| phase | U-Net work per step | steps measured | time / step | full run | compile (cold) | peak mem |",
    "|---|---|---|---|---|---|---|",
  ]
  work = {
    "ddim": "1 forward (batch 1)",
    "nti": f"1 forward (batch 1) + {inner_steps} x forward-and-backward (batch 1) + 1 forward (batch 2)",
    "dual": "1 forward (batch 4: [null, P] x [source, target])",
  }
  for phase, m in rows.items():
    if "error" in m:
      lines.append(f"| {LABELS[phase]} | {work[phase]} | failed: {m['error']} | | | | |")
      continue
    lines.append(
      f"| {LABELS[phase]} | {work[phase]} | {m['steps']} | {_fmt(m['step_s'], ' s')} "
      f"| {_full_run(phase, m, inner_steps)} | {_fmt(m['compile_s'], ' s')} | {_fmt(m['peak_mib'], ' MiB')} |"
    )
  ok = [rows[p] for p in ("ddim", "nti") if "step_s" in rows.get(p, {})]
  if len(ok) == 2:
    total = FULL_STEPS * sum(m["step_s"] for m in ok)
    lines += [
      "",
      f"One null-text inversion (DDIM inversion + NTI, {FULL_STEPS} x {inner_steps}): {_fmt(total, ' s')}.",
    ]
  mem = next((m["mem_kind"] for m in rows.values() if "mem_kind" in m), "n/a")
  lines += ["", f"Peak memory: {mem}, in the measuring process."]
  return "\n".join(lines)


INTRO = (
  "## Inversion\n\nWritten by `benchmarks/inversion.py` (see `benchmarks/README.md`); each platform's "
  "part is replaced by a run on that platform."
)


NOT_MEASURED = {
  "cpu": "### CPU\n\nNot measured yet.",
  "gpu": "### GPU\n\nNot measured yet (no GPU lent). On a GPU machine, `python benchmarks/inversion.py` "
  "(512 px, bfloat16, all 50 steps measured) replaces this part.",
}


def write_section(
  path: str,
  which: str,
  section: str,
  *,
  tag: str = "inversion",
  intro: str = INTRO,
  not_measured=NOT_MEASURED,
) -> None:
  """Replaces platform `which`'s part of the section `intro` of `path` (creating what is missing).

  Args:
    path: the results file (benchmarks/RESULTS.md).
    which: "cpu" or "gpu".
    section: the new text of that part.
    tag: names the part's markers (`<!-- lusd-{tag}:{which}:begin -->`).
    intro: the section's heading and first paragraph (appended with both parts when missing).
    not_measured: {"cpu": text, "gpu": text} for a part no run has written yet.
  """
  begin = "<!-- lusd-" + tag + ":{}:begin -->"
  end = "<!-- lusd-" + tag + ":{}:end -->"
  text = open(path).read() if os.path.exists(path) else "# LUSD-JAX benchmark results\n"
  if intro not in text:
    parts = "\n\n".join(f"{begin.format(p)}\n{not_measured[p]}\n{end.format(p)}" for p in ("cpu", "gpu"))
    text = text.rstrip("\n") + f"\n\n{intro}\n\n{parts}\n"
  pattern = re.compile(re.escape(begin.format(which)) + r".*?" + re.escape(end.format(which)), re.S)
  text = pattern.sub(lambda _: f"{begin.format(which)}\n{section}\n{end.format(which)}", text)
  with open(path, "w") as f:
    f.write(text)


def environment(
  info: dict, started, load_start: str, size: int, dtype: str, unet: str, script: str, argv
) -> dict:
  """What `header_lines` reports of a run that started at `started` and ends now."""
  finished = datetime.datetime.now(datetime.timezone.utc)
  return dict(
    platform=info["platform"],
    device=info["device"],
    cpu=_cpu_model(),
    cores=os.cpu_count(),
    memory=_memory_gib(),
    load_start=load_start,
    load_end=_load(),
    started=started.strftime("%Y-%m-%d %H:%M UTC"),
    minutes=(finished - started).total_seconds() / 60,
    versions=_versions(),
    size=size,
    dtype=dtype,
    unet=unet,
    command=" ".join([f"python {script}", *(sys.argv[1:] if argv is None else argv)]),
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--size", type=int, default=None, choices=[256, 512], help="image side (CPU 256, GPU 512)"
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help=f"outer steps measured per phase (default: {FULL_STEPS} on GPU; on CPU "
    + ", ".join(f"{LABELS[p]} {n}" for p, n in CPU_STEPS.items())
    + f"); a {FULL_STEPS}-step run is extrapolated when fewer",
  )
  parser.add_argument(
    "--inner-steps", type=int, default=10, help="Adam steps per NTI step, forced (default 10)"
  )
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="params and activations (auto: bfloat16 on GPU, float32 on CPU)")  # fmt: skip
  parser.add_argument(
    "--unet", default="sd15", choices=["sd15", "tiny"], help="tiny: a quick check of the script"
  )
  parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per measuring process")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md"), help="'' to not write")
  parser.add_argument("--_worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:
    _worker_main(json.loads(args._worker))
    return
  if args.steps is not None and not 1 <= args.steps <= FULL_STEPS:
    parser.error(f"--steps must be in [1, {FULL_STEPS}]")
  # The parent never initializes a JAX backend (on a GPU it would hold memory the workers need).
  info = _spawn(dict(kind="info"), args.timeout)
  if "error" in info:
    raise SystemExit(f"cannot start JAX: {info['error']}")
  on_gpu = info["platform"] == "gpu"
  size = args.size or (512 if on_gpu else 256)
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = _load()
  print(
    f"device: {info['platform']} ({info['device']}); {size} px; {dtype}; load avg {load_start}", flush=True
  )
  rows = {}
  for phase in args.phases:
    steps = args.steps or (FULL_STEPS if on_gpu else CPU_STEPS[phase])
    with tempfile.TemporaryDirectory(prefix="lusd_inv_bench_cache_") as cache:
      spec = dict(
        kind="measure", phase=phase, size=size, dtype=dtype, steps=steps, inner_steps=args.inner_steps,
        unet=args.unet, cache_dir=cache,
      )  # fmt: skip
      m = rows[phase] = _spawn(spec, args.timeout)
    if "error" in m:
      print(f"  {LABELS[phase]}: failed: {m['error']}", flush=True)
      continue
    extra = f"; inner steps {m['inner_steps']}" if phase == "nti" else ""
    print(
      f"  {LABELS[phase]}: {_fmt(m['step_s'], ' s')}/step measured over {steps} step(s){extra}; "
      f"{_full_run(phase, m, args.inner_steps)}; compile {_fmt(m['compile_s'], ' s')} (cold); "
      f"peak RSS/memory {_fmt(m['peak_mib'], ' MiB')}; finite {m['finite']}",
      flush=True,
    )
  env = environment(info, started, load_start, size, dtype, args.unet, "benchmarks/inversion.py", argv)
  section = render(env, rows, args.inner_steps)
  print("\n" + section)
  if args.out:
    write_section(args.out, "gpu" if on_gpu else "cpu", section)
    print(f"wrote the {'GPU' if on_gpu else 'CPU'} part of the Inversion section of {args.out}")


if __name__ == "__main__":
  main()
