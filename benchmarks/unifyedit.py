"""One UnifyEdit edit on SD1.5's U-Net (random weights): inversion and denoising, against the paper's A100.

Prints numbers and writes this platform's part of the "## UnifyEdit" section of `--out`
(benchmarks/RESULTS.md); never a test. Three measurements, each in a fresh worker process (cold
compile from an empty temporary compilation cache; the peak memory is that of one measurement):

- the inversion phase of one edit, as `inversion.py` measures it (its own workers run here):
  DDIM inversion (batch-1 U-Net call per step) and null-text inversion (w = 7.5, `--inner-steps`
  Adam steps forced at every step: no early stop, an upper bound);
- the denoising phase: `engine.run_chunk` of `unifyedit.core.UnifyEdit` (N = 50) for the first
  `--steps` steps. Per step: one U-Net call for the source self-attention maps (batch 1), one for
  the target's maps with one backward pass vmapped over the two cotangents (g_SAP, g_CAA), one
  4-row CFG call ([null, P] x source, [null, P*] x target) and the DDIM steps, blending included.
  tau1 = tau2 = 0, so both constraints act at every step (the worst case; the program computes and
  normalizes both gradients at every step anyway, a term outside its window is weighted by 0, so the
  time per step does not depend on tau); one edit word (padded to `MAX_EDIT_WORDS` rows, as the
  pipeline does) and a half-image mask (`has_mask` True: region masks, blending).

The element is synthetic but has the real shapes: random z_T, inversion trajectory [51, h, w, 4],
null embeddings [50, 77, 768] and prompts [77, 768]. Every step of a phase costs the same (the
timestep is only a number; NTI's inner count is forced), so a 50-step phase is extrapolated as
50 x the measured time per step; the output says which numbers are measured and which extrapolated.

The last table sets the totals beside the paper's A100 figures (512 px, real SD1.5 weights, PyTorch,
their NTI with early stopping): 87.9 s inversion, 24.2 s denoising, 21.4 GB. On CPU at 256 px that is
a different machine, size and memory kind: read it as an order of magnitude, not a comparison.

  python benchmarks/unifyedit.py                        # CPU: 256 px; 3 / 1 / 2 steps measured
  python benchmarks/unifyedit.py --sa-resolutions 16,8  # object edits: L_SAP on latent/4 and /8 only
  python benchmarks/unifyedit.py                        # on a GPU: 512 px, float32, all 50 steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks import inversion as inv_bench  # noqa: E402
from benchmarks.benchmark import _fmt, _load, _peak_memory_mib, _reset_peak_memory  # noqa: E402

FULL_STEPS = inv_bench.FULL_STEPS  # 50: the paper's DDIM steps
PHASES = ("ddim", "nti", "unifyedit")
LABELS = {"ddim": "DDIM inversion", "nti": "null-text inversion", "unifyedit": "UnifyEdit denoising"}
# Measured steps per phase on CPU (an SD1.5 U-Net forward at 256 px takes seconds; an NTI step ~1.5 min).
CPU_STEPS = {"ddim": 3, "nti": 1, "unifyedit": 2}
# Mao et al., one 512x512 edit on an A100 (their efficiency paragraph): seconds, seconds, GB.
PAPER = {"inversion_s": 87.9, "denoise_s": 24.2, "memory_gb": 21.4}


# ----------------------------------------------------------------------------- worker


def _element(s: dict, size: int):
  """One synthetic UnifyEdit element (`UnifyInputs`) with the shapes of a real 50-step edit."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lusd_jax.unifyedit.core import UnifyInputs, word_weights
  from lusd_jax.unifyedit.pipeline import MAX_EDIT_WORDS

  k = jax.random.split(jax.random.key(7), 2)
  z = s["z"]
  traj = jax.random.normal(k[0], (FULL_STEPS + 1,) + z.shape, jnp.float32)
  nulls = s["null"] + 0.01 * jax.random.normal(k[1], (FULL_STEPS,) + s["null"].shape, jnp.float32)
  ww, valid = word_weights([(5,)], s["ctx"].shape[0], MAX_EDIT_WORDS)  # one edit word, one token
  mask = np.zeros((size, size), np.float32)
  mask[:, : size // 2] = 1.0  # a half-image region: R_l's inside/outside means, Eq. 16's M, blending
  return UnifyInputs(
    z_T=traj[-1],
    trajectory=traj,
    null_embeddings=nulls,
    ctx_src=s["ctx"],
    ctx_tgt=s["ctx_tgt"],
    word_weights=jnp.asarray(ww),
    word_valid=jnp.asarray(valid),
    mask=jnp.asarray(mask),
    has_mask=jnp.bool_(True),
  )


def worker_denoise(size: int, dtype_name: str, steps: int, unet_name: str, sa_resolutions) -> dict:
  """Compiles, then times one execution of `steps` UnifyEdit denoising steps (in this fresh process)."""
  import jax
  import numpy as np

  from lusd_jax import engine
  from lusd_jax.unifyedit.config import UnifyEditConfig, stack_numeric
  from lusd_jax.unifyedit.core import UnifyEdit

  s = inv_bench._setup(size, dtype_name, unet_name)
  config = UnifyEditConfig(num_steps=FULL_STEPS, tau1=0, tau2=0, sa_resolutions=sa_resolutions)
  method = UnifyEdit(s["unet_fn"], s["schedule"], config.static())
  inputs_B = jax.tree.map(lambda a: a[None], _element(s, size))
  numeric_B = stack_numeric([config])
  keys_B = jax.random.split(jax.random.key(0), 1)
  _reset_peak_memory()
  out = {}
  t0 = time.perf_counter()
  state_B = jax.block_until_ready(engine.init_batch(method, inputs_B, keys_B, numeric_B))
  statics = dict(method=method, num=steps, mesh=None)
  dynamic = dict(params=s["params"], inputs_B=inputs_B, state_B=state_B, k0=0, numeric_B=numeric_B)
  compiled = engine.run_chunk.lower(**dynamic, **statics).compile()
  out["compile_s"] = time.perf_counter() - t0
  t1 = time.perf_counter()
  _, stats = jax.block_until_ready(compiled(**dynamic))
  out["run_s"] = time.perf_counter() - t1
  out["finite"] = bool(np.asarray(stats.finite).all())
  # What the measured steps computed (lambda1 is 0 at t = T by Eq. 14; the gradient ran anyway).
  for name in ("lambda1", "lambda2", "sap_loss", "caa_loss", "sap_grad_norm", "caa_grad_norm"):
    out[name] = np.asarray(getattr(stats, name))[0].astype(float).tolist()
  out["sa_layers"] = _layer_infos(method, size // 8)
  out["peak_mib"], out["mem_kind"] = _peak_memory_mib(jax.devices()[0])
  out.update(steps=steps, step_s=out["run_s"] / steps)
  return out


def _layer_infos(method, h: int) -> list[str]:
  """The self-attention layers L_SAP reads at a h x h latent (names, for the report)."""
  from lusd_jax.models import unet as unet_lib

  layers = unet_lib.map_layers(method.unet_fn.config, (h, h), method.specs(h)[0]).self_layers
  return [f"{info.hw[0]}x{info.hw[1]}" for info in layers]


def _worker_main(spec: dict) -> None:
  from lusd_jax.compilation_cache import enable_compilation_cache

  if spec.get("cache_dir"):
    enable_compilation_cache(spec["cache_dir"])
  out = worker_denoise(spec["size"], spec["dtype"], spec["steps"], spec["unet"], spec["sa_resolutions"])
  print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- report


def _how(m: dict) -> str:
  return "measured" if m["steps"] >= FULL_STEPS else "extrapolated"


def render(env: dict, rows: dict, inner_steps: int, sa_resolutions: str) -> str:
  size = env["size"]
  lines = inv_bench.header_lines(env) + [
    "",
    f"{'SD1.5' if env['unet'] == 'sd15' else 'The tiny'} U-Net architecture, random weights, {size} px "
    f"({size // 8}x{size // 8} latent), {env['dtype']}, one edit (one element). Each row is one fresh "
    "process: compile (cold, empty cache), then one timed execution of the measured steps (its first, so "
    f"allocation included). UnifyEdit: tau1 = tau2 = 0 (both constraints at every step), L_SAP on "
    f"{sa_resolutions} self-attention layers, one edit word, a half-image mask.",
    "",
    "| phase | U-Net work per step | steps measured | time / step | 50-step phase | compile (cold) | peak mem |",
    "|---|---|---|---|---|---|---|",
  ]
  work = {
    "ddim": "1 forward (batch 1)",
    "nti": f"1 forward (batch 1) + {inner_steps} x forward-and-backward (batch 1) + 1 forward (batch 2)",
    "unifyedit": "1 forward with self maps (batch 1, source) + 1 forward with self and cross maps and "
    "1 backward vmapped over 2 cotangents (batch 1, target) + 1 forward (batch 4: CFG of both branches)",
  }
  for phase, m in rows.items():
    if "error" in m:
      lines.append(f"| {LABELS[phase]} | {work[phase]} | failed: {m['error']} | | | | |")
      continue
    what = f"{FULL_STEPS} x {inner_steps} inner" if phase == "nti" else f"{FULL_STEPS} steps"
    lines.append(
      f"| {LABELS[phase]} | {work[phase]} | {m['steps']} | {_fmt(m['step_s'], ' s')} "
      f"| {_fmt(FULL_STEPS * m['step_s'], ' s')} ({what}, {_how(m)}) | {_fmt(m['compile_s'], ' s')} "
      f"| {_fmt(m['peak_mib'], ' MiB')} |"
    )
  d = rows.get("unifyedit", {})
  if "step_s" in d:
    lines += [
      "",
      f"UnifyEdit's measured steps: L_SAP reads {len(d['sa_layers'])} self-attention layers "
      f"({', '.join(d['sa_layers'])}); lambda1 "
      f"{_nums(d['lambda1'])}, lambda2 {_nums(d['lambda2'])}, L_SAP {_nums(d['sap_loss'])}, L_CAA "
      f"{_nums(d['caa_loss'])}, |g_SAP| {_nums(d['sap_grad_norm'])}, |g_CAA| {_nums(d['caa_grad_norm'])}; "
      f"all finite: {d['finite']}. (lambda1 = 0 at t = T by Eq. 14; both gradients are computed at every step.)",
    ]
  mem = next((m["mem_kind"] for m in rows.values() if "mem_kind" in m), "n/a")
  lines += ["", f"Peak memory: {mem}, in the measuring process.", ""]
  lines += _paper_table(rows, env, inner_steps)
  return "\n".join(lines)


def _nums(xs) -> str:
  return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"


def _paper_table(rows: dict, env: dict, inner_steps: int) -> list[str]:
  on_gpu = env["platform"] == "gpu"
  size = env["size"]
  ok = lambda p: "step_s" in rows.get(p, {})  # noqa: E731
  inv_s = FULL_STEPS * (rows["ddim"]["step_s"] + rows["nti"]["step_s"]) if ok("ddim") and ok("nti") else None
  den_s = FULL_STEPS * rows["unifyedit"]["step_s"] if ok("unifyedit") else None
  peaks = [m["peak_mib"] for m in rows.values() if "peak_mib" in m]
  peak_gb = max(peaks) * 2**20 / 1e9 if peaks else None
  inv_how = ""
  if inv_s is not None:
    inv_how = "measured" if all(_how(rows[p]) == "measured" for p in ("ddim", "nti")) else "extrapolated"
  den_how = _how(rows["unifyedit"]) if ok("unifyedit") else ""
  here = (
    f"{env['device']}, {size} px, {env['dtype']}, random weights, JAX"
    if on_gpu
    else f"CPU ({env['cores']} shared cores), {size} px, {env['dtype']}, random weights, JAX"
  )
  like = on_gpu and size == 512
  head = "| | this run | paper (A100, 512 px, SD1.5 weights, PyTorch) |" + (" this / paper |" if like else "")
  sep = "|---|---|---|" + ("---|" if like else "")
  ratio = lambda a, b: f" {a / b:.2f}x |" if like and a is not None else (" — |" if like else "")  # noqa: E731
  mem_here = "device peak bytes in use, max over phases" if on_gpu else "host peak RSS, max over phases"
  if like:
    caveat = "; still another GPU and framework, and NTI without early stopping)."
  else:
    differs = ["other hardware"] + (["a quarter of the pixels"] if size == 256 else [])
    differs += [] if on_gpu else ["host RAM vs GPU memory"]
    caveat = f"; **not a like-for-like comparison**: {', '.join(differs)})."
  lines = [
    f"Against the paper's figures ({here} vs an A100 at 512 px{caveat}",
    "",
    head,
    sep,
    f"| inversion (DDIM + NTI, {FULL_STEPS} x <= {inner_steps} inner) | "
    + (
      f"{_fmt(inv_s, ' s')} ({inv_how}; NTI inner steps forced, an upper bound)" if inv_s is not None else "—"
    )
    + f" | {PAPER['inversion_s']} s (with early stopping) |"
    + ratio(inv_s, PAPER["inversion_s"]),
    f"| denoising ({FULL_STEPS} steps) | {_fmt(den_s, ' s')}{f' ({den_how})' if den_how else ''} "
    f"| {PAPER['denoise_s']} s |" + ratio(den_s, PAPER["denoise_s"]),
    f"| peak memory | {_fmt(peak_gb, ' GB')} ({mem_here}, params included) | {PAPER['memory_gb']} GB (GPU) |"
    + ratio(peak_gb, PAPER["memory_gb"]),
  ]
  return lines


INTRO = (
  "## UnifyEdit\n\nWritten by `benchmarks/unifyedit.py` (see `benchmarks/README.md`): one UnifyEdit edit, "
  "inversion and denoising measured separately, beside the paper's A100 figures; each platform's part is "
  "replaced by a run on that platform."
)
NOT_MEASURED = {
  "cpu": "### CPU\n\nNot measured yet.",
  "gpu": "### GPU\n\nNot measured yet (no GPU lent). On a GPU machine, `python benchmarks/unifyedit.py` "
  "(512 px, float32, all 50 steps of every phase measured) replaces this part.",
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--size", type=int, default=None, choices=[256, 512], help="image side (CPU 256, GPU 512)"
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help=f"steps measured per phase (default: {FULL_STEPS} on GPU; on CPU "
    + ", ".join(f"{LABELS[p]} {n}" for p, n in CPU_STEPS.items())
    + f"); a {FULL_STEPS}-step phase is extrapolated when fewer",
  )
  parser.add_argument(
    "--inner-steps", type=int, default=10, help="Adam steps per NTI step, forced (default 10)"
  )
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="U-Net params and activations (default float32)")  # fmt: skip
  parser.add_argument(
    "--sa-resolutions",
    default="all",
    help="L_SAP's self-attention layers: all, or heights at a 64x64 latent such as 16,8 (object edits)",
  )
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
  from lusd_jax.unifyedit.config import UnifyEditConfig

  try:  # checked here, before any worker starts
    sa = UnifyEditConfig(sa_resolutions=args.sa_resolutions).sa_resolutions
  except ValueError as e:
    parser.error(f"--sa-resolutions: {e}")
  sa_text = "all" if sa == "all" else ",".join(map(str, sa))
  # The parent never initializes a JAX backend (on a GPU it would hold memory the workers need).
  info = inv_bench._spawn(dict(kind="info"), args.timeout)
  if "error" in info:
    raise SystemExit(f"cannot start JAX: {info['error']}")
  on_gpu = info["platform"] == "gpu"
  size = args.size or (512 if on_gpu else 256)
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = _load()
  print(
    f"device: {info['platform']} ({info['device']}); {size} px; {args.dtype}; load avg {load_start}",
    flush=True,
  )
  rows = {}
  for phase in args.phases:
    steps = args.steps or (FULL_STEPS if on_gpu else CPU_STEPS[phase])
    with tempfile.TemporaryDirectory(prefix="lusd_unify_bench_cache_") as cache:
      spec = dict(
        kind="measure", phase=phase, size=size, dtype=args.dtype, steps=steps, inner_steps=args.inner_steps,
        unet=args.unet, cache_dir=cache, sa_resolutions=sa,
      )  # fmt: skip
      # The inversion phases run inversion.py's own workers (the same programs and numbers).
      script = None if phase in ("ddim", "nti") else __file__
      m = rows[phase] = inv_bench._spawn(spec, args.timeout, script)
    if "error" in m:
      print(f"  {LABELS[phase]}: failed: {m['error']}", flush=True)
      continue
    print(
      f"  {LABELS[phase]}: {_fmt(m['step_s'], ' s')}/step measured over {steps} step(s); "
      f"{FULL_STEPS} steps {_fmt(FULL_STEPS * m['step_s'], ' s')} ({_how(m)}); compile "
      f"{_fmt(m['compile_s'], ' s')} (cold); peak RSS/memory {_fmt(m['peak_mib'], ' MiB')}; finite {m['finite']}",
      flush=True,
    )
  env = inv_bench.environment(
    info, started, load_start, size, args.dtype, args.unet, "benchmarks/unifyedit.py", argv
  )
  section = render(env, rows, args.inner_steps, sa_text)
  print("\n" + section)
  if args.out:
    which = "gpu" if on_gpu else "cpu"
    inv_bench.write_section(args.out, which, section, tag="unifyedit", intro=INTRO, not_measured=NOT_MEASURED)
    print(f"wrote the {which.upper()} part of the UnifyEdit section of {args.out}")


if __name__ == "__main__":
  main()
