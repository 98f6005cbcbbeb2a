#!/usr/bin/env bash
# GPU readiness check (issue 18): on a machine with an NVIDIA GPU, in one call that fits a 10-minute
# limit, runs the GPU parity tests, a cuDNN-attention check, benchmarks/benchmark.py for SD1.5 at
# 1 and 8 seeds (bfloat16, mixed-float16, float32), benchmarks/unifyedit.py --size 512 (if present)
# and benchmarks/inversion.py; writes RESULTS.md's GPU sections and copies the results to $OUT.
#
#   bash benchmarks/gpu_check.sh                 # everything, highest priority first, within --budget
#   bash benchmarks/gpu_check.sh --dry-run       # print the steps and their commands, run nothing
#   bash benchmarks/gpu_check.sh --only parity,bench512-bf16   # or --skip STEP,...; --budget SECONDS
#   bash benchmarks/gpu_check.sh --fetch-wheels  # HERE (with a registry): wheels to carry to a GPU box
#
# Every step runs under `timeout`, bounded by what is left of --budget (default 560 s), so the whole
# script returns inside a 600 s call with whatever it measured: RESULTS.md is rewritten after every
# benchmark measurement and copied to $OUT after every step, with the log and a timings table.
# A step that finished is remembered in $STATE (/tmp/lusd_gpu_check, kept while the machine stays
# warm), so a second call goes on with the steps left; --fresh forgets them.
#
# Setup takes seconds when the machine already has a GPU jax, torch and diffusers (the lent H200's
# image has jax with its CUDA plugin and torch, not diffusers: carry the wheels of --fetch-wheels in
# .whl/). Only when jax sees no GPU does it install as on a bare machine with a registry:
# `pip install -c constraints.txt -e ".[test]"`, then `jax[cuda12]` at constraints.txt's jax version.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PY=${PYTHON:-python3}
STATE=${LUSD_GPU_STATE:-/tmp/lusd_gpu_check}
DEST=${OUT:-$REPO/out/gpu_check}  # $OUT: the device tool's folder that comes back; /out/ is git-ignored
BUDGET=560
DRY=0
FRESH=0
ONLY=""
SKIP=""
FETCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --fresh) FRESH=1 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --skip) SKIP=$2; shift ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
pin() { sed -n "s/^$1==//p" constraints.txt; }

# Packages the GPU image lacks (pure-Python wheels), fetched here for the device tool's `carry`.
if [ "$FETCH" = 1 ]; then
  cmd=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    -d .whl "diffusers==$(pin diffusers)")  # pure Python; its needs are in the image (py3.12: no importlib-metadata)
  if [ "$DRY" = 1 ]; then echo "${cmd[*]}"; exit 0; fi
  exclude=$(git rev-parse --git-path info/exclude)  # .whl/ travels (carry) but is never committed
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  mkdir -p .whl
  "${cmd[@]}" && ls -l .whl && echo "carry [\".whl\"] in the device call"
  exit
fi

START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
LOG=$STATE/gpu_check.log
TIMES=$STATE/timings.tsv
if [ "$DRY" = 0 ]; then
  mkdir -p "$STATE" "$DEST"
  if [ "$FRESH" = 1 ]; then rm -f "$STATE"/done.* "$STATE"/benchmark_gpu.json "$STATE"/RESULTS.md "$LOG" "$TIMES"; fi
  [ -f "$TIMES" ] || printf 'step\tstatus\tseconds\ttimeout\n' >"$TIMES"
fi
# Carried wheels go to a folder of their own, ahead of the image's packages; the repo is importable
# without an install (the scripts and `python -m pytest` put it on sys.path anyway).
export PYTHONPATH="$STATE/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# A second call on a warm machine gets a fresh copy of the tree: put back the sections written so far.
if [ "$DRY" = 0 ] && [ -f "$STATE/RESULTS.md" ]; then cp "$STATE/RESULTS.md" benchmarks/RESULTS.md; fi

say() {
  local line="[gpu_check $(date -u +%H:%M:%S), +$(elapsed) s] $*"
  if [ "$DRY" = 1 ]; then echo "# $line"; else echo "$line" | tee -a "$LOG"; fi
}

collect() {  # what comes back: at most 8 files (the device tool's limit); 5 here
  cp benchmarks/RESULTS.md "$STATE/RESULTS.md" 2>/dev/null
  cp benchmarks/RESULTS.md "$LOG" "$TIMES" "$DEST/" 2>/dev/null
  [ -f "$STATE/benchmark_gpu.json" ] && cp "$STATE/benchmark_gpu.json" "$DEST/"
  [ -f "$STATE/env.txt" ] && cp "$STATE/env.txt" "$DEST/"
  return 0
}

wanted() {
  case ",$SKIP," in *",$1,"*) return 1 ;; esac
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  return 1
}

# step NAME MAX_S MIN_S COMMAND: runs COMMAND under `timeout min(MAX_S, what is left - 15 s)`, or skips
# it when less than MIN_S would be left (a step that cannot finish only burns device time).
step() {
  local name=$1 max=$2 min=$3 cmd=$4
  wanted "$name" || return 0
  if [ "$DRY" = 0 ] && [ -f "$STATE/done.$name" ]; then say "$name: done in an earlier call (--fresh to redo)"; return 0; fi
  local left=$((BUDGET - $(elapsed) - 15)) t=$max
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt "$min" ]; then
    say "$name: SKIPPED, ${left} s of the budget left, needs ${min} s"
    [ "$DRY" = 0 ] && printf '%s\tskipped\t0\t%s\n' "$name" "$t" >>"$TIMES"
    return 0
  fi
  if [ "$DRY" = 1 ]; then
    printf '\n# step %s: timeout min(%s s, budget left - 15 s); skipped if under %s s left\n%s\n' "$name" "$max" "$min" "$cmd"
    return 0
  fi
  say "$name: start (timeout ${t} s): $cmd"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$t" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in 0) status=ok; touch "$STATE/done.$name" ;; 124|137) status=TIMEOUT ;; *) status="FAILED(rc=$rc)" ;; esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$t" >>"$TIMES"
  say "$name: $status in $(($(date +%s) - t0)) s"
  collect
}

# ---------------------------------------------------------------------------------------------- steps

JAXV=$(pin jax)
IMPORTS='import importlib.util as u, sys
need = {"jax": "jax", "flax": "flax", "optax": "optax", "torch": "torch", "diffusers": "diffusers",
        "pytest": "pytest", "xdist": "pytest-xdist", "safetensors": "safetensors", "transformers": "transformers",
        "PIL": "pillow", "tqdm": "tqdm"}
print(" ".join(p for m, p in need.items() if u.find_spec(m) is None))'
SETUP="set -e
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target '$STATE/site' .whl/*.whl
fi
if ! $PY -c 'import jax, sys; sys.exit(jax.default_backend() != \"gpu\")' 2>/dev/null; then
  echo 'jax sees no GPU: installing as on a bare machine (needs a package registry)'
  $PY -m pip install -q -c constraints.txt -e '.[test]'
  $PY -m pip install -q 'jax[cuda12]==$JAXV'
fi
missing=\$($PY -c '$IMPORTS')
if [ -n \"\$missing\" ]; then
  echo \"missing: \$missing\"
  $PY -m pip install -q --retries 1 --timeout 15 -c constraints.txt \$missing
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c 'import sys, jax, jaxlib, flax, torch, diffusers
print(\"python\", sys.version.split()[0], \"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\",
      flax.__version__, \"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), \"diffusers\",
      diffusers.__version__)
print(jax.devices())'
  echo \"constraints.txt pins jax $JAXV: a different jax above is the image's own (nothing to fetch there)\"
} | tee '$STATE/env.txt'"
step setup 240 20 "$SETUP"

# JAX on the GPU against diffusers (PyTorch, CPU, float32) with the same weights: tiny and SD1.5
# architectures, eps, attention maps, gradients through the maps; attention implementations against
# the explicit softmax; the Pallas kernels (compiled by Triton there, not interpreted) and the
# attention registry. Float32 matmuls at full precision (XLA's GPU default is TF32, which the 1e-4
# parity tolerance does not allow for); 4 xdist workers share the GPU (no preallocation).
step parity 200 60 "JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false OMP_NUM_THREADS=4 \
$PY -m pytest -q -p no:cacheprovider -n 4 -rfE tests/test_unet.py tests/test_unet_maps.py tests/test_attention.py \
tests/test_kernels.py tests/test_attention_registry.py"

# What the float32 tests cannot see: cuDNN flash attention (bfloat16 only) on SD1.5's layer shapes
# against a float32 explicit softmax, and a bfloat16 SD1.5 U-Net (auto attention: cuDNN) against float32.
CUDNN_CHECK=$STATE/cudnn_check.py
[ "$DRY" = 1 ] && CUDNN_CHECK=/dev/null  # --dry-run writes nothing
cat >"$CUDNN_CHECK" <<'EOF'
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.benchmark import _unet_dict
from lusd_jax.lusd import core
from lusd_jax.models import attention, unet

assert jax.default_backend() == "gpu", jax.devices()
rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
worst = 0.0
for t, s, h in [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (256, 256, 160), (64, 77, 160)]:
  q, k, v = (jax.random.normal(jax.random.key(i), (2, n, 8, h), jnp.float32) for i, n in enumerate((t, s, s)))
  with jax.default_matmul_precision("highest"):
    ref = attention.attention_with_probs(q, k, v)[0]
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  row = []
  for impl in ("cudnn", "xla", "chunked"):
    fn = jax.jit(functools.partial(attention.dot_product_attention, impl=impl))
    err = rel(fn(q16, k16, v16), ref)
    row.append(f"{impl} {err:.2e}")
    worst = max(worst, err) if impl == "cudnn" else worst
  print(f"attention T={t} S={s} head dim {h}, bfloat16 vs float32 (rel. L2):", ", ".join(row), flush=True)
assert worst < 2e-2, f"cuDNN attention off by {worst:.2e} (relative L2)"

cfg = unet.UNetConfig.from_dict(_unet_dict("sd15"))
params = unet.init_params(cfg, 0, jnp.float32)
x = jax.random.normal(jax.random.key(1), (2, 32, 32, 4), jnp.float32)
ctx = jax.random.normal(jax.random.key(2), (2, 77, 768), jnp.float32)
tt = jnp.array([500, 500], jnp.int32)
with jax.default_matmul_precision("highest"):
  ref = jax.jit(lambda p: core.FlaxUNet(cfg, "float32", "xla")(p, x, tt, ctx, None)[0])(params)
p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
t0 = time.perf_counter()
out = jax.jit(lambda p: core.FlaxUNet(cfg, "bfloat16", "auto")(p, x, tt, ctx, None)[0])(p16)
err = rel(out, ref)
print(f"SD1.5 U-Net 32x32 latent, bfloat16 + auto attention vs float32: rel. L2 {err:.2e} "
      f"({time.perf_counter() - t0:.0f} s with compile); finite {bool(np.isfinite(np.asarray(out, np.float32)).all())}")
assert err < 5e-2, err
print("cuDNN check passed")
EOF
step cudnn 120 40 "$PY '$STATE/cudnn_check.py'  # written above: cuDNN attention and a bfloat16 U-Net against float32"

# LUSD's target: SD1.5 at 512, 1 and 8 seeds, bfloat16, with PyTorch's forward (its own worker) and the
# per-layer attention table. Each benchmark step adds its rows to one JSON (--append), so the GPU section
# of RESULTS.md holds every step's rows, whichever call ran it.
BENCH="$PY benchmarks/benchmark.py --seeds 1 8 --steps 20 --json '$STATE/benchmark_gpu.json' --append --timeout 200"
step bench512-bf16 300 150 "$BENCH --configs sd15-512 --dtype bfloat16 --torch-reference"

# UnifyEdit's target: 50 steps + inversion at 512 under the paper's A100 time (112 s) by 5x.
if [ -f benchmarks/unifyedit.py ]; then
  step unifyedit 300 120 "$PY benchmarks/unifyedit.py --size 512 --timeout 280"
elif wanted unifyedit; then
  say "unifyedit: benchmarks/unifyedit.py not in this tree, skipped"
fi

# mixed-float16 is precision.py's GPU default (the U-Net in float16); float32 for reference.
step bench512-f16 200 100 "$BENCH --configs sd15-512 --dtype mixed-float16 --torch-reference --no-attention-layers"
step bench512-f32 200 100 "$BENCH --configs sd15-512 --dtype float32 --torch-reference --no-attention-layers"
step bench256 300 100 "$BENCH --configs sd15-256 --dtype bfloat16 mixed-float16 float32 --torch-reference --no-attention-layers"
step inversion 240 100 "$PY benchmarks/inversion.py --timeout 220"

if [ "$DRY" = 1 ]; then
  echo; echo "# budget ${BUDGET} s: steps run in this order while their minimum is left; a second call goes on with the rest"
  exit 0
fi
collect
say "finished; step timings:"
column -t -s $'\t' "$TIMES" 2>/dev/null | tee -a "$LOG" || cat "$TIMES"
collect
