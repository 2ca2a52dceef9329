#!/usr/bin/env bash
# Fills a wheels folder for an offline NVIDIA GPU machine whose Python (3.12)
# already has jax[cuda], flax, optax, orbax, transformers, torch, pandas,
# pyarrow, absl, etils, chex and jaxtyping, but not the packages below.
# Run it where PyPI is reachable; then copy the folder beside the repo and
# run `bash scripts/gpu_check.sh WHEELS_DIR OUT_DIR` on the GPU machine.
#
#   bash scripts/gpu_wheels.sh [WHEELS_DIR] [PYTHON_VERSION]
#
# Every wheel is fetched without its dependencies (--no-deps) and installed
# the same way, so nothing already on the machine (jax above all) is
# replaced. The list is pinned: each line was checked against its wheel's
# Requires-Dist. xprof is only here because `import tokamax` imports it.
set -euo pipefail
WHEELS=${1:-wheels}
PY=${2:-3.12}
PYTHON=${PYTHON:-python3}
PACKAGES=(
  # The data pipeline and the config.
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  ml_collections==1.1.0
  # Evaluation metrics and JSON-schema checks.
  rouge-score==0.0.4 nltk==3.10.4 defusedxml==0.7.1
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1
  # The fused GPU attention (optional; needs jax >= 0.11.1).
  tokamax==0.0.17 xprof==2.24.2 qwix==0.1.8 einshape==1.0
  immutabledict==4.3.1 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  tensorboardx==2.6.5
)
mkdir -p "$WHEELS"
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
  --python-version "$PY" --implementation cp "${platforms[@]}" \
  -d "$WHEELS" "${PACKAGES[@]}"
echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
