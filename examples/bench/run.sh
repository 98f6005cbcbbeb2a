#!/usr/bin/env bash
# The side-by-side demo on the bundled benchmark: LUSD and UnifyEdit edit every row of
# examples/bench/index.csv, then `lusd-jax eval` scores both result folders with both protocols.
#
#   examples/bench/run.sh [--model MODEL] [OUT]       # default model: SD 1.5; default OUT: outputs/bench
#   examples/bench/run.sh --model tiny-random          # no weights needed: random model, quick
#
# With --model tiny-random the edits are noise and the numbers meaningless (random weights): the demo
# then shows the pipeline, the files and the pictures, at 128 px with 3 steps per method. Set
# LUSD_JAX="python -m lusd_jax.cli" to run a checkout that is not installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="stable-diffusion-v1-5/stable-diffusion-v1-5"
OUT="outputs/bench"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --model=*) MODEL="${1#--model=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (usage: run.sh [--model MODEL] [OUT])" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
read -r -a CLI <<< "${LUSD_JAX:-lusd-jax}"

LUSD_FLAGS=()
UNIFY_FLAGS=()
EVAL_FLAGS=()
if [[ "$MODEL" == "tiny-random" ]]; then
  # The settings the tests compile (the persistent compilation cache serves them): 128 px, T = 3.
  LUSD_FLAGS=(--size 128 --num-steps 3 --quiet)
  UNIFY_FLAGS=(--size 128 --num-steps 3 --tau1 1 --tau2 1 --inversion ddim --quiet)
  EVAL_FLAGS=(--clip tiny-random --clip-l tiny-random --dino tiny-random)
fi

set -x
"${CLI[@]}" batch --method lusd --model "$MODEL" --input-dir "$HERE" --output-dir "$OUT/lusd" ${LUSD_FLAGS[@]+"${LUSD_FLAGS[@]}"}
"${CLI[@]}" batch --method unifyedit --model "$MODEL" --input-dir "$HERE" --output-dir "$OUT/unifyedit" \
  ${UNIFY_FLAGS[@]+"${UNIFY_FLAGS[@]}"}
# Both protocols over both folders: tables per edit type, the Fig. 7 scatter, report.md.
"${CLI[@]}" eval --dataset "$HERE" --results "$OUT/lusd" "$OUT/unifyedit" --protocol all --out "$OUT/eval" \
  ${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}
