#!/usr/bin/env bash
# One run on a fresh NVIDIA GPU machine (jax >= 0.11 with CUDA installed):
# installs the missing packages from a local wheels folder, runs the
# GPU-only tests, then the benchmark table. At most ~8 minutes; everything
# lands in one folder.
#
#   bash scripts/gpu_check.sh [WHEELS_DIR] [OUT_DIR]
#
# Fill WHEELS_DIR beforehand on a machine with PyPI access, for the GPU
# machine's Python (3.12 here), e.g.:
#   pip download -d wheels --python-version 3.12 --only-binary=:all: \
#     grain datasets ml_collections "tokamax>=0.0.17" chitchat-dataset
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
OUT=${2:-gpu_check_out}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/log.txt"; }

log "environment"
{ nvidia-smi; python -V
  timeout 60 python -c "import jax; print(jax.__version__, jax.devices())"; } \
  > "$OUT/env.txt" 2>&1

log "install from $WHEELS (no index)"
timeout 90 python -m pip install -q --no-index --find-links "$WHEELS" \
  grain datasets ml_collections tokamax chitchat-dataset \
  > "$OUT/install.txt" 2>&1 || log "some wheels missing (see install.txt)"
export PYTHONPATH=$PWD
python -m pip freeze > "$OUT/pip_freeze.txt" 2>&1

# The default GPU XLA flags: keep them only if this XLA accepts them.
FLAGS=$(python -c "from sft_jax import xla_flags; print(xla_flags.with_gpu_flags(''))")
if XLA_FLAGS="$FLAGS" timeout 60 python -c "import jax; jax.numpy.ones(1).block_until_ready()" \
    > "$OUT/flags_check.txt" 2>&1; then
  log "GPU XLA flags accepted: $FLAGS"
else
  log "GPU XLA flags rejected by this XLA; running with SFT_JAX_GPU_FLAGS=0"
  export SFT_JAX_GPU_FLAGS=0
fi

log "GPU tests"
JAX_PLATFORMS=cuda timeout 120 python -m pytest -q tests/attention_gpu_test.py \
  tests/attention_test.py -k "not splash" --junitxml="$OUT/tests.xml" \
  > "$OUT/tests.txt" 2>&1
log "tests exit $? ($(tail -1 "$OUT/tests.txt"))"

log "benchmark table"
remaining=$(( 450 - ($(date +%s) - start) ))
JAX_PLATFORMS=cuda timeout $(( remaining > 30 ? remaining : 30 )) \
  python scripts/benchmark_table.py --out-dir "$OUT" \
  --budget-s $(( remaining > 180 ? remaining - 180 : 0 )) \
  --row-timeout-s 170 > "$OUT/table.txt" 2>&1
log "table exit $?"
cat "$OUT"/*.md 2>/dev/null | tee -a "$OUT/log.txt"
log "done"
