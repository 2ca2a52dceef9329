#!/usr/bin/env bash
# One run on a fresh NVIDIA GPU machine (jax >= 0.11 with CUDA installed):
# installs the missing packages from a local wheels folder, runs the
# GPU-only tests, the PyTorch side-by-side run, then the benchmark table.
# At most ~8 minutes; everything lands in one folder.
#
#   bash scripts/gpu_check.sh [WHEELS_DIR] [OUT_DIR]
#
# Fill WHEELS_DIR beforehand, where PyPI is reachable, with the pinned
# wheels the GPU machine lacks (for its Python, 3.12 here):
#   bash scripts/gpu_wheels.sh wheels 3.12
#
# CHECK_PLATFORM (default cuda) and CHECK_ROWS (default accelerator) let the
# script's own plumbing be tried on a CPU machine: CHECK_PLATFORM=cpu
# CHECK_ROWS=tiny.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
OUT=${2:-gpu_check_out}
PLATFORM=${CHECK_PLATFORM:-cuda}
ROWS=${CHECK_ROWS:-accelerator}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/log.txt"; }

log "environment"
{ nvidia-smi || true; python -V
  timeout 60 python -c "import jax; print(jax.__version__, jax.devices())"; } \
  > "$OUT/env.txt" 2>&1

log "install from $WHEELS (no index, no dependencies: nothing installed is replaced)"
SITE=$(mktemp -d)
pip_install() {  # SECONDS WHEEL...
  local limit=$1; shift
  timeout "$limit" python -m pip install -q --no-index --no-deps --no-compile \
    --target "$SITE" "$@"
}
# All at once; if one wheel is refused, the others one by one.
if ! pip_install 90 "$WHEELS"/*.whl > "$OUT/install.txt" 2>&1; then
  for whl in "$WHEELS"/*.whl; do
    pip_install 30 "$whl" >> "$OUT/install.txt" 2>&1 \
      || log "not installed: $(basename "$whl") (see install.txt)"
  done
fi
export PYTHONPATH=$SITE:$PWD
python -c "import grain, datasets, ml_collections; print('data ok')" \
  >> "$OUT/install.txt" 2>&1 || log "data packages do not import (see install.txt)"
python -c "import tokamax; print('tokamax', tokamax.__file__)" \
  >> "$OUT/install.txt" 2>&1 || log "tokamax does not import (see install.txt)"
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
JAX_PLATFORMS=$PLATFORM timeout 120 python -m pytest -q tests/attention_gpu_test.py \
  tests/attention_test.py -k "not splash" --junitxml="$OUT/tests.xml" \
  > "$OUT/tests.txt" 2>&1
log "tests exit $? ($(tail -1 "$OUT/tests.txt"))"

log "side by side with PyTorch"
if [ "$PLATFORM" = cuda ]; then
  timeout 110 python scripts/compare_torch.py --device cuda --model 1b \
    --batch 2 --seq-len 4096 --steps 5 --warmup 2 > "$OUT/compare_torch.txt" 2>&1
else
  timeout 110 python scripts/compare_torch.py --steps 2 --warmup 1 \
    --seq-len 256 > "$OUT/compare_torch.txt" 2>&1
fi
log "compare exit $? ($(tail -1 "$OUT/compare_torch.txt"))"

log "benchmark table"
remaining=$(( 450 - ($(date +%s) - start) ))
JAX_PLATFORMS=$PLATFORM timeout $(( remaining > 30 ? remaining : 30 )) \
  python scripts/benchmark_table.py --rows "$ROWS" --out-dir "$OUT" \
  --budget-s $(( remaining > 180 ? remaining - 180 : 0 )) \
  --row-timeout-s 170 > "$OUT/table.txt" 2>&1
log "table exit $?"
cat "$OUT"/*.md 2>/dev/null | tee -a "$OUT/log.txt"
log "done"
