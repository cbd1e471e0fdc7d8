#!/usr/bin/env bash
# bench/gpu.sh: shoal on one CUDA GPU (an H200 lent through the device tool) in at most ~8 minutes.
#
# On a full-size random S1 checkpoint (openaudio-s1-mini's shape, bfloat16; shoal.testing.write_full_size_checkpoint)
# it runs `shoal bench` three times: eager, compiled (SHOAL_COMPILE), compiled with CUDA graphs (SHOAL_CUDA_GRAPHS);
# then once on a full-size random S2-Pro checkpoint (write_full_size_s2_checkpoint, written by the bench itself),
# compiled with CUDA graphs. Each at concurrency 1, 8 and 32 (max_batch_size 32) plus a streamed ~3 s utterance
# (time to first audio), every level in one process per configuration (--one-process: one load and one compile
# each). Results: bench/results/<date>-gpu-{eager,cuda-graphs,compiled,s2-cuda-graphs}.md and .json, copied to $OUT
# too when it is set (the device tool brings back what lands there), with this script's log.
#
#   bash bench/gpu.sh                  # on the GPU machine, from the repository root
#   bash bench/gpu.sh --dry-run        # anywhere, no GPU: the same steps on the CPU with the tiny fixtures (eager
#                                      # S1 and S2 only; the compiled commands are printed, not run) into a temporary
#                                      # folder
#   bash bench/gpu.sh --fetch-wheels   # where pip reaches PyPI: the wheels the GPU machine's image lacks, into .whl/
#
# The GPU machine reaches no package registry. Its python3 has torch (a CUDA build), numpy, tiktoken, pyyaml and
# psutil, but not pydantic(-settings), python-dotenv, platformdirs, soundfile, soxr or av: run --fetch-wheels here
# first and carry .whl (under 40 MB) with the run; the script installs them into a temporary folder, with no index.
# Settings (environment): PYTHON (python3; .venv/bin/python when there is one for --dry-run and --fetch-wheels),
# SHOAL_GPU_TOKENS (64), SHOAL_GPU_LEVELS (1,8,32), SHOAL_GPU_BUDGET_S (480, the whole run), SHOAL_GPU_WORK
# (/tmp/shoal-gpu: the checkpoint and the inductor cache), SHOAL_GPU_OUT (bench/results; --dry-run: a temp dir).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
START=$(date +%s)
MODE=run
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry-run ;;
  --fetch-wheels) MODE=fetch-wheels ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu.sh: unknown option $1 (use --dry-run, --fetch-wheels or nothing)" >&2; exit 2 ;;
esac

WHEELS=.whl
# Runtime dependencies of `shoal bench` that the GPU machine's image does not have (KINDS.md in the device
# library lists what it has), at the versions installed where --fetch-wheels runs.
MISSING_ON_GPU="pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions
python-dotenv platformdirs soundfile cffi pycparser soxr av tokenizers safetensors"
GPU_PYTHON_VERSION=3.12  # the GPU image's python3
TOKENS=${SHOAL_GPU_TOKENS:-64}
LEVELS=${SHOAL_GPU_LEVELS:-1,8,32}
BUDGET_S=${SHOAL_GPU_BUDGET_S:-480}
WORK=${SHOAL_GPU_WORK:-/tmp/shoal-gpu}
RESERVE_S=15  # kept back at the end for the summary and copying the results
if [ -x .venv/bin/python ] && [ "$MODE" != run ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

say() { echo "gpu.sh: $*" >&2; }
die() { say "$1"; exit "${2:-1}"; }
note() { echo "gpu.sh: $*" | tee -a "$LOG" >&2; }  # said, and kept in the log

if [ "$MODE" = fetch-wheels ]; then
  mkdir -p "$WHEELS"
  grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  # shellcheck disable=SC2086
  specs=$("$PY" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $MISSING_ON_GPU)
  platforms=""
  for p in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms="$platforms --platform ${p}_x86_64"
  done
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" --implementation cp \
    $platforms -d "$WHEELS" $specs
  say "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS/: carry it (run's carry: [\"$WHEELS\"])"
  exit 0
fi

# -- fail fast: the GPU, then the dependencies ------------------------------------------------------------------
if [ "$MODE" = run ]; then
  why=$("$PY" -c 'import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA GPU" + ("" if torch.version.cuda else " (a CPU-only build)"))' 2>&1) \
    || die "cannot run $PY with torch: ${why##*$'\n'}" 2
  [ -z "$why" ] || die "$why; this script needs one GPU (bash bench/gpu.sh --dry-run checks it on the CPU)" 2
fi
SITE=""
if [ -d "$WHEELS" ] && [ "$MODE" = run ]; then
  SITE=$(mktemp -d /tmp/shoal-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || die "installing the carried wheels from $WHEELS failed (made for python $GPU_PYTHON_VERSION)" 3
fi
export PYTHONPATH="$REPO/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
missing=$("$PY" -c 'import shoal.compose, shoal.bench' 2>&1) \
  || die "shoal cannot be imported here (${missing##*$'\n'}): run bash bench/gpu.sh --fetch-wheels where pip reaches \
PyPI and carry $WHEELS" 3

# -- the runs -----------------------------------------------------------------------------------------------------
if [ "$MODE" = run ]; then
  OUT_DIR=${SHOAL_GPU_OUT:-bench/results}
  WHAT=(--full-size --work-dir "$WORK" --device cuda --precision bfloat16 --tokens "$TOKENS" --concurrency "$LEVELS"
        --max-batch-size "${LEVELS##*,}")
  CHECKPOINT="$WORK/openaudio-s1-mini-random-seed0"  # where `shoal bench --full-size` looks in its work dir
  mkdir -p "$WORK"
  if [ ! -d "$CHECKPOINT" ]; then
    say "writing the full-size random checkpoint to $CHECKPOINT"
    "$PY" -m shoal.bench write-full-size "$CHECKPOINT" 0
  fi
else
  OUT_DIR=${SHOAL_GPU_OUT:-$(mktemp -d /tmp/shoal-gpu-dry-run.XXXXXX)}
  WHAT=(--tiny --device cpu --precision float32 --tokens 8 --concurrency 1,2 --max-batch-size 2 --bandwidth-mib 64)
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/$(date +%F)-gpu.log"
say "$MODE: results into $OUT_DIR, log $LOG"

# name, weight in the remaining time, extra flags. CUDA graphs before plain compile: they are what the GPU
# targets need, so they get their turn first if compiling runs long. S2-Pro last: its checkpoint is written inside
# its own time. The dry run adds S2 eager, so that the S2 path runs somewhere without a GPU.
CONFIGS=("eager|1|" "cuda-graphs|2|--compile --cuda-graphs" "compiled|1|--compile"
         "s2-cuda-graphs|2|--s2 --compile --cuda-graphs")
weights_left=6
if [ "$MODE" = dry-run ]; then CONFIGS+=("s2-eager|1|--s2"); weights_left=7; fi
failed=0
for config in "${CONFIGS[@]}"; do
  IFS='|' read -r name weight flags <<<"$config"
  # shellcheck disable=SC2206
  cmd=("$PY" -m shoal bench "${WHAT[@]}" --no-reference --one-process $flags --label "gpu-$name" --out "$OUT_DIR")
  if [ "$MODE" = dry-run ] && [[ "$flags" == *--compile* ]]; then
    say "dry run, not run: ${cmd[*]}"
    continue
  fi
  left=$(( START + BUDGET_S - RESERVE_S - $(date +%s) ))
  cap=$(( left * weight / weights_left ))
  weights_left=$(( weights_left - weight ))
  if [ "$cap" -lt 30 ]; then
    note "$name: skipped, ${left}s of the ${BUDGET_S}s budget left"
    failed=1
    continue
  fi
  note "$name: up to ${cap}s: ${cmd[*]}"
  t0=$(date +%s)
  set +e
  timeout --kill-after=10 "$cap" "${cmd[@]}" >>"$LOG" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    note "$name: done in $(( $(date +%s) - t0 ))s"
  else
    failed=1
    case $rc in
      124|137) why="timed out after ${cap}s (its figures are lost; the log has its progress)" ;;
      *) why="failed (exit $rc): $(grep -v '^\s*$' "$LOG" | tail -1)" ;;
    esac
    note "$name: $why"
  fi
done

# -- summary and hand-back ------------------------------------------------------------------------------------------
for md in "$OUT_DIR"/"$(date +%F)"-gpu-*.md; do
  [ -f "$md" ] || continue
  echo "== $(basename "$md")"
  grep -E '^\| (decode per token|throughput|utterance: (time to first audio|total)|model load)' "$md" \
    | cut -d'|' -f2-4,7 || true
done
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && [ "$OUT" != "$OUT_DIR" ]; then
  cp "$OUT_DIR"/"$(date +%F)"-gpu-* "$OUT"/ 2>/dev/null || true
fi
note "finished in $(( $(date +%s) - START ))s"
exit "$failed"
