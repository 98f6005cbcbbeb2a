"""U-Net precision: how a bfloat16 / float16 U-Net (the mixed dtype policies) moves LUSD against float32.

Prints numbers and writes them to the "## Precision" section of `--out` (benchmarks/RESULTS.md); never a
test. On SD1.5's U-Net architecture with random weights, for fixed z_src, z = z_src + a small
perturbation, text embeddings and (t, eps) draws, it runs one real LUSD step (`core.run_steps`, k = N/2,
filtering off so that every dtype uses the same draw) with the U-Net in float32, bfloat16 and float16,
and compares against float32:

- std(g), g = eps_tgt - eps_src (the filter's statistic and Eq. 4's normalizer): relative error;
- the raw attention mask M of the call (Alg. 2, `EditState.prev_mask`): max and mean |difference|;
- the update z_new - z (the normalized, masked direction of Eq. 4-5 times the step size): relative L2
  error and cosine similarity.

The U-Net output is cast to float32 before g (`core._seed_step`), as under every lusd-jax dtype policy;
the official code computes g and std(g) in fp16 under autocast.

Random weights are not SD's weights: the script scales the init's output layer so that the float32 eps
prediction has std 1 (a real eps prediction does), reports the largest activation of a float32 forward
(it must stay far below float16's 65504), and builds the target prompt's embedding from the source's by
changing the tokens after a 5-token prefix (CLIP is causal: tokens before an edited word do not change).
The size of that change sets std(g), and half-precision rounding of eps (std ~1) matters relative to
std(g): two contexts are measured, "far" (independent tokens: std(g) much larger than real edits') and
"near" (the change scaled so that float32 std(g) is about `--near-std`, LUSD's eta_0 = 0.01 being the
scale real std(g) is filtered at). The recommendation is read off the "near" rows.

  python benchmarks/precision.py                       # CPU: 256 and 512 px (float16 at 512 if affordable)
  python benchmarks/precision.py --sizes 256 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.benchmark import _cpu_model, _memory_gib, _random_params, _unet_dict  # noqa: E402
from lusd_jax import schedule as schedule_lib  # noqa: E402
from lusd_jax.compiler import jit  # noqa: E402
from lusd_jax.lusd import core  # noqa: E402
from lusd_jax.lusd.config import LUSDConfig  # noqa: E402
from lusd_jax.models import unet as unet_lib  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
POLICY = {"bfloat16": "mixed-bfloat16", "float16": "mixed-float16"}
EDIT_TOKEN = 5  # the first target token that differs from the source ("a photo of a <word>")
EPS_SEED = 7
FLOAT16_MAX = 65504.0
# What "close enough for a default" means, per quantity (worst draw of the "near" context):
#   std(g) within 2%: the filter's eta decays by 1% per rejection, so a 2% error moves acceptance by
#   about two redraws; the update direction's cosine >= 0.99 (the step goes where float32's goes, up
#   to an 8 degree angle); the mask within 0.05 (max) and 0.01 (mean) on its [0, 1] scale.
CRITERIA = {"std_rel_max": 0.02, "cos_min": 0.99, "mask_max": 0.05, "mask_mean": 0.01}


def _table_noise(key, step, attempt, *, ts, shape):
  """Draw i (the seed of `key`): t = ts[i], eps ~ N(0, I) from fold_in(key(EPS_SEED), i); any step."""
  del step, attempt
  i = jax.random.key_data(key)[-1]
  t = jnp.asarray(ts, jnp.int32)[i]
  return t, jax.random.normal(jax.random.fold_in(jax.random.key(EPS_SEED), i), shape, jnp.float32)


@functools.cache
def _noise_fn(ts: tuple[int, ...], shape: tuple[int, ...]):
  # One object per (ts, shape): run_steps compiles per noise_fn, and a partial hashes by identity.
  return functools.partial(_table_noise, ts=ts, shape=shape)


def _activation_stats(config, params, latent: int):
  """(std of the float32 eps at t=500, largest |activation| of any module, its module)."""

  def fwd(params, z, ctx):
    (out, _), state = unet_lib.UNet2DConditionModel(config).apply(
      {"params": params}, z, jnp.array([500]), ctx, capture_intermediates=True, mutable=["intermediates"]
    )
    leaves = jax.tree_util.tree_leaves_with_path(state["intermediates"])
    return jnp.std(out), {jax.tree_util.keystr(path): jnp.max(jnp.abs(x)) for path, x in leaves}

  k = jax.random.split(jax.random.key(3), 2)
  z = jax.random.normal(k[0], (1, latent, latent, 4), jnp.float32)
  ctx = jax.random.normal(k[1], (2, 77, config.cross_attention_dim), jnp.float32)
  std, maxes = jit(fwd)(params, z, ctx)
  name, peak = max(((n, float(v)) for n, v in maxes.items()), key=lambda kv: kv[1])
  return float(std), peak, name


def _inputs(latent: int, dim: int, rho: float) -> core.EditInputs:
  k = jax.random.split(jax.random.key(1), 3)
  ctx_src = jax.random.normal(k[1], (77, dim), jnp.float32)
  delta = jax.random.normal(k[2], (77, dim), jnp.float32)
  changed = (jnp.arange(77) >= EDIT_TOKEN)[:, None]
  if rho is None:  # "far": independent tokens after the prefix
    ctx_tgt = jnp.where(changed, delta, ctx_src)
  else:
    ctx_tgt = ctx_src + rho * changed * delta
  edit_mask = jnp.zeros((77,), jnp.float32).at[EDIT_TOKEN].set(1.0)
  z_src = jax.random.normal(k[0], (latent, latent, 4), jnp.float32)
  return core.EditInputs(z_src, ctx_src, ctx_tgt, edit_mask)


def _run(config, params32, dtype: str, inputs: core.EditInputs, ts: tuple[int, ...]):
  """One LUSD step (k = N/2) per draw with the U-Net in `dtype`: per-draw std(g), mask, update."""
  lusd = LUSDConfig(filtering=False)
  numeric, static = lusd.numeric(), lusd.static()
  params = jax.tree.map(lambda x: x.astype(dtype), params32)
  # chunked: float32 scores and softmax at every size and dtype, as cuDNN's flash attention on a GPU.
  unet_fn = core.FlaxUNet(config, dtype, "chunked")
  shape = inputs.z_src.shape
  noise_fn = _noise_fn(ts, tuple(shape))
  z = inputs.z_src + 0.1 * jax.random.normal(jax.random.key(2), shape, jnp.float32)
  out = {"std": [], "mask": [], "update": [], "finite": []}
  t0 = time.perf_counter()
  for i in range(len(ts)):  # one draw at a time: the batch-8 SD1.5 program at 512 px is too big here
    state = core.init_state(inputs, jax.random.key(i)[None], numeric)
    state = state._replace(z=z[None])
    new, stats = core.run_steps(
      unet_fn, params, inputs, state, static.num_steps // 2, numeric, static=static,
      schedule=schedule_lib.Schedule(), num=1, noise_fn=noise_fn,
    )  # fmt: skip
    out["std"].append(float(stats.grad_std[0, 0]))
    out["mask"].append(np.asarray(new.prev_mask[0]))
    out["update"].append(np.asarray(new.z[0] - z))
    out["finite"].append(bool(stats.finite[0, 0]) and bool(np.all(np.isfinite(out["mask"][-1]))))
  return out, time.perf_counter() - t0


def _compare(ref: dict, got: dict) -> dict:
  std_rel, mask_max, mask_mean, upd_rel, cos = [], [], [], [], []
  for i in range(len(ref["std"])):
    std_rel.append(abs(got["std"][i] - ref["std"][i]) / ref["std"][i])
    dm = np.abs(got["mask"][i] - ref["mask"][i])
    mask_max.append(float(dm.max()))
    mask_mean.append(float(dm.mean()))
    a, b = got["update"][i].ravel().astype(np.float64), ref["update"][i].ravel().astype(np.float64)
    upd_rel.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
  return dict(
    std_rel=(np.mean(std_rel), np.max(std_rel)),
    mask_max=(np.mean(mask_max), np.max(mask_max)),
    mask_mean=(np.mean(mask_mean), np.max(mask_mean)),
    upd_rel=(np.mean(upd_rel), np.max(upd_rel)),
    cos=(np.mean(cos), np.min(cos)),
    nonfinite=sum(not f for f in got["finite"]),
  )


def _pct(x):
  return f"{100 * x:.2f}%"


def _row(size, context, std32, dtype, c, wall):
  if c is None:
    return f"| {size} | {context} | {dtype} ({POLICY.get(dtype, dtype)}) | — | — | — | — | — | — | {wall} |"
  bad = f" **{c['nonfinite']} non-finite**" if c["nonfinite"] else ""
  return (
    f"| {size} | {context} | {dtype} ({POLICY[dtype]}){bad} | {std32} | {_pct(c['std_rel'][0])} / {_pct(c['std_rel'][1])} "
    f"| {c['mask_max'][0]:.4f} / {c['mask_max'][1]:.4f} | {c['mask_mean'][0]:.5f} / {c['mask_mean'][1]:.5f} "
    f"| {_pct(c['upd_rel'][0])} / {_pct(c['upd_rel'][1])} | {c['cos'][0]:.5f} / {c['cos'][1]:.5f} | {wall} |"
  )


def _passes(c) -> bool:
  return (
    c["nonfinite"] == 0
    and c["std_rel"][1] <= CRITERIA["std_rel_max"]
    and c["cos"][1] >= CRITERIA["cos_min"]
    and c["mask_max"][1] <= CRITERIA["mask_max"]
    and c["mask_mean"][1] <= CRITERIA["mask_mean"]
  )


def recommend(near: dict) -> str:
  """The GPU default read off the "near" rows: {dtype: [comparison per size]}."""

  def worst(rows):
    return dict(
      std=max(c["std_rel"][1] for c in rows),
      mask_max=max(c["mask_max"][1] for c in rows),
      mask_mean=max(c["mask_mean"][1] for c in rows),
      cos=min(c["cos"][1] for c in rows),
      nonfinite=sum(c["nonfinite"] for c in rows),
    )

  def summary(dtype):
    w = worst(near[dtype])
    return (
      f"`{POLICY[dtype]}`: std(g) within {_pct(w['std'])}, mask within {w['mask_max']:.3f} (max) / "
      f"{w['mask_mean']:.4f} (mean), update cosine >= {w['cos']:.4f}, {w['nonfinite']} non-finite"
    )

  ok = [d for d in ("bfloat16", "float16") if near.get(d) and all(_passes(c) for c in near[d])]
  lines = [f"- {summary(d)}" for d in ("bfloat16", "float16") if near.get(d)]
  crit = (
    f"std(g) within {_pct(CRITERIA['std_rel_max'])}, update cosine >= {CRITERIA['cos_min']}, mask within "
    f"{CRITERIA['mask_max']} (max) / {CRITERIA['mask_mean']} (mean), no inf/NaN, on every draw and size"
  )
  if "bfloat16" in ok:
    # bfloat16 has float32's range: real weights' activation outliers cannot overflow it.
    verdict = f"**GPU default: `mixed-bfloat16`** (it meets the bar: {crit})."
  elif "float16" in ok:
    verdict = (
      f"**GPU default: `mixed-float16`** (the official code's split; it meets the bar, {crit}, and "
      "`mixed-bfloat16` does not). float16's range (65504) must still be checked on real weights."
    )
  else:
    verdict = (
      f"**Keep `float32` as the default until real weights are measured**: no half-precision policy meets "
      f"the bar ({crit}) on these random weights."
    )
  return "\n".join(lines + ["", verdict])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--sizes", nargs="+", type=int, default=[256, 512], help="image sides (latent = side / 8)"
  )
  parser.add_argument("--ts", nargs="+", type=int, default=[100, 400, 700, 900], help="one draw per t")
  parser.add_argument("--near-std", type=float, default=0.02, help="float32 std(g) of the 'near' context")
  parser.add_argument("--far-sizes", nargs="*", type=int, default=[256], help="sizes that also run 'far'")
  parser.add_argument("--fp16-budget-s", type=float, default=480.0,
                      help="skip float16 at a size whose predicted time exceeds this (XLA:CPU float16 is slow)")  # fmt: skip
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md"))
  parser.add_argument("--no-write", dest="write", action="store_false")
  args = parser.parse_args(argv)

  started = time.perf_counter()
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  command = (
    "python benchmarks/precision.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
  )
  config = unet_lib.UNetConfig.from_dict(_unet_dict("sd15"))
  params32 = _random_params(config, jnp.float32)
  std0, _, _ = _activation_stats(config, params32, 32)
  # Scale the output layer so that the float32 eps prediction has std 1, as a real one does.
  scale = 1.0 / std0
  params32 = {
    **params32,
    "conv_out": {**params32["conv_out"], "kernel": params32["conv_out"]["kernel"] * scale},
  }
  std1, peak, peak_at = _activation_stats(config, params32, 32)
  notes = [
    "Random weights (SD1.5's U-Net architecture, LeCun-normal init of `benchmarks/benchmark.py`), not SD's "
    "checkpoint: activation statistics, attention maps and so the mask differ from a real model's.",
    f"Output layer scaled by {scale:.3f} so that the float32 eps prediction has std {std1:.3f} (t = 500, 256 px).",
    f"Largest |activation| of any module in that float32 forward: {peak:.1f} ({peak_at}); float16 overflows "
    f"at {FLOAT16_MAX:.0f}. Real SD weights have larger activation outliers: this does not show that "
    "float16 cannot overflow on them.",
  ]
  for n in notes:
    print("note:", n, flush=True)

  header = (
    "| image | context | U-Net dtype (policy) | float32 std(g) (mean) | std(g) rel. err (mean / max) "
    "| mask max abs diff (mean / max) | mask mean abs diff (mean / max) | update rel. L2 err (mean / max) "
    "| update cosine (mean / min) | wall time |"
  )
  rows = [header, "|" + "---|" * 10]
  ts = tuple(args.ts)
  near = {d: [] for d in ("bfloat16", "float16")}
  skipped = []
  rho = None
  walls = {}  # (size, dtype) -> seconds

  def report(final: bool) -> None:
    table = "\n".join(rows)
    rec = recommend(near)
    if final:
      print()
      print(table)
      print()
      print(rec)
    total = (time.perf_counter() - started) / 60
    section = "\n".join(
      [
        "## Precision",
        "",
        "Written by `benchmarks/precision.py` (see its docstring): one LUSD step (`core.run_steps` at k = N/2, "
        "filtering off, SBP) per (t, eps) draw with the U-Net in bfloat16 or float16 (VAE and text encoder play "
        "no part: the mixed policies keep them in float32), compared with the same step in float32. "
        f"Draws: t in {{{', '.join(map(str, ts))}}}, one eps each; mean and worst over the draws. The update is "
        "z_new - z (the normalized, masked direction of Eq. 4-5 times the step). The mask is the raw mask M "
        "of the call, in [0, 1].",
        "",
        f"- Date: {date} (run took {total:.1f} min)",
        f"- Machine: {_cpu_model()}, {os.cpu_count()} cores, {_memory_gib()} RAM; {jax.devices()[0].platform} "
        f"(jax {jax.__version__}, Python {platform.python_version()}); shared, so wall times are upper bounds",
        f"- Command: `{command}`",
        "- Contexts: source = N(0, 1) [77, 768]; target = source on the first "
        f"{EDIT_TOKEN} tokens, then either independent N(0, 1) tokens (far) or source + {rho:.4f} x N(0, 1) "
        f"(near, scaled so that float32 std(g) is about {args.near_std}; LUSD filters at eta_0 = 0.01). "
        "Half-precision rounding of eps (std ~1) is absolute, so its effect on g grows as std(g) shrinks: "
        "the near rows are the ones that resemble real edits.",
        *[f"- {n}" for n in notes],
        *[f"- {m} (the float16 rows at smaller sizes stand for it)." for m in skipped],
        "- On CPU, XLA computes bfloat16/float16 dots and convolutions with float32 accumulation, as GPU "
        "tensor cores do; the elementwise rounding may differ from a GPU's. Uncaptured attention layers use "
        "`chunked` (float32 scores and softmax, like cuDNN flash attention): XLA:CPU's fused attention "
        "cannot compile float16 (`F16_F16_F32` dot precision unsupported), which is why `core.FlaxUNet` "
        "takes `chunked` for a float16 U-Net on CPU whatever the sequence length.",
        "",
        table,
        "",
        rec,
      ]
    )
    if args.write:
      write_section(args.out, section)
      print(f"\nwrote the Precision section of {args.out}")

  for size in args.sizes:
    latent = size // 8
    contexts = (["far"] if size in args.far_sizes or rho is None else []) + ["near"]
    for context in contexts:
      if context == "near" and rho is None:
        raise SystemExit(
          "the 'near' context is calibrated on a 'far' run: list the first size in --far-sizes"
        )
      inputs = _inputs(latent, config.cross_attention_dim, None if context == "far" else rho)
      results = {}
      for dtype in DTYPES:
        if dtype == "float16" and (size, "float32") in walls and args.sizes[0] != size:
          first = args.sizes[0]
          predicted = walls[(first, "float16")] * walls[(size, "float32")] / walls[(first, "float32")]
          if predicted > args.fp16_budget_s:
            msg = f"float16 at {size} px not measured: predicted {predicted:.0f} s > {args.fp16_budget_s:.0f} s on this CPU"
            print(msg, flush=True)
            skipped.append(msg)
            rows.append(_row(size, context, "", dtype, None, f"skipped (~{predicted:.0f} s predicted)"))
            continue
        results[dtype], wall = _run(config, params32, dtype, inputs, ts)
        walls.setdefault((size, dtype), wall)
        print(
          f"{size} px {context} {dtype}: {wall:.1f} s; std(g) {np.round(results[dtype]['std'], 5).tolist()}",
          flush=True,
        )
        if dtype == "float32":
          std32 = float(np.mean(results[dtype]["std"]))
          if context == "far" and rho is None:
            # std(g) grows about linearly with a small change of the context: aim at --near-std.
            rho = args.near_std / std32
            print(f"near context: target = source + {rho:.4f} x N(0, 1) after the prefix", flush=True)
          continue
        c = _compare(results["float32"], results[dtype])
        if context == "near":
          near[dtype].append(c)
        rows.append(
          _row(
            size,
            context,
            f"{std32:.4f}",
            dtype,
            c,
            f"{wall:.0f} s (float32: {walls[(size, 'float32')]:.0f} s)",
          )
        )
        print(rows[-1], flush=True)
    report(final=size == args.sizes[-1])


_BEGIN, _END = "<!-- lusd-precision:begin -->", "<!-- lusd-precision:end -->"


def write_section(path: str, section: str) -> None:
  """Replaces (or appends) the marked Precision section of `path`."""
  text = open(path).read() if os.path.exists(path) else "# LUSD-JAX benchmark results\n"
  block = f"{_BEGIN}\n{section}\n{_END}"
  if _BEGIN in text:
    text = re.sub(re.escape(_BEGIN) + r".*?" + re.escape(_END), lambda _: block, text, flags=re.S)
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  with open(path, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
