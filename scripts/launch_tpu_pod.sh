#!/usr/bin/env bash
# Runs sft-jax on every worker of a Cloud TPU pod slice (TPU VM).
#
# A pod slice is several hosts; each runs the SAME command. `sft-jax train`
# calls jax.distributed.initialize() with no arguments, which on a TPU VM finds
# the coordinator, the process count and this host's index by itself (the
# TPU_WORKER_HOSTNAMES / TPU_WORKER_ID metadata), so no address is passed.
# Every host reads only its share of the data; process 0 writes metrics and
# TensorBoard; Orbax checkpoints are written by all hosts together, so the
# run directory must be storage every worker sees at the same path: a gs://
# bucket mounted with gcsfuse, or Filestore NFS.
#
# usage:
#   export TPU_NAME=my-v5p-64 ZONE=us-east5-a [PROJECT=my-project]
#   scripts/launch_tpu_pod.sh setup          # copy this repo, make the venv
#   scripts/launch_tpu_pod.sh train --config configs/presets/llama3_8b.py \
#       --workdir /mnt/shared/runs/l8b [--config.KEY=VALUE ...]
#   scripts/launch_tpu_pod.sh sweep experiments/llama31_8b_lora_mix.py \
#       --workdir /mnt/shared/sweeps/l8b_mix
#   scripts/launch_tpu_pod.sh stop           # SIGTERM: checkpoint and exit
#
# `sweep` runs the sweep runner on every worker: each runs the points in the
# same order, and each point's train processes (one per host) form one job.
# Re-running either command resumes from the shared run directory.
#
# environment (set here, passed to every worker):
#   TPU_NAME, ZONE      the TPU VM and its zone (required)
#   PROJECT             gcloud project (default: gcloud's configured one)
#   REMOTE_DIR          repo location on the workers (default ~/sft_jax)
#   HF_TOKEN            hub token for gated models (Llama); forwarded if set
#   HF_HOME             hub cache on the workers (default ~/.cache/huggingface;
#                       host-local is fine: every host downloads the weights)
#   EXTRA_ENV           more "K=V K2=V2" to export on the workers, e.g.
#                       LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-~/sft_jax}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

gcloud_ssh() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE"
             --worker=all)
  if [[ -n "${PROJECT:-}" ]]; then cmd+=(--project "$PROJECT"); fi
  "${cmd[@]}" --command "$1"
}

remote_env() {
  local env="export TOKENIZERS_PARALLELISM=false"
  if [[ -n "${HF_TOKEN:-}" ]]; then env+=" HF_TOKEN=$(printf %q "$HF_TOKEN")"; fi
  if [[ -n "${HF_HOME:-}" ]]; then env+=" HF_HOME=$(printf %q "$HF_HOME")"; fi
  if [[ -n "${EXTRA_ENV:-}" ]]; then env+=" $EXTRA_ENV"; fi
  echo "$env"
}

sub="${1:-}"
shift || true
case "$sub" in
  setup)
    # Ship the working tree (no venv, no runs) to every worker, then install
    # JAX for TPU and sft_jax in a venv there.
    tarball="$(mktemp /tmp/sft_jax.XXXXXX.tgz)"
    tar -C "$REPO" --exclude=.venv --exclude=runs --exclude=.git -czf \
        "$tarball" .
    scp_cmd=(gcloud compute tpus tpu-vm scp "$tarball"
             "$TPU_NAME:/tmp/sft_jax.tgz" --zone "$ZONE" --worker=all)
    if [[ -n "${PROJECT:-}" ]]; then scp_cmd+=(--project "$PROJECT"); fi
    "${scp_cmd[@]}"
    rm -f "$tarball"
    gcloud_ssh "set -e; mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/sft_jax.tgz && cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q 'jax[tpu]' && .venv/bin/pip install -q -e . && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    ;;
  train|sweep)
    args="$(printf ' %q' "$@")"
    gcloud_ssh "$(remote_env); cd $REMOTE_DIR && .venv/bin/sft-jax $sub$args"
    ;;
  stop)
    # SIGTERM makes train write a checkpoint and exit; re-run to resume.
    gcloud_ssh "pkill -TERM -f 'sft_jax train|sft-jax train' || true"
    ;;
  *)
    sed -n '2,40p' "$0"
    exit 2
    ;;
esac
