#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, started by srun.
#
# `sft-jax train` calls jax.distributed.initialize() with no arguments when
# SLURM_NTASKS > 1. JAX then reads, per process:
#   SLURM_JOB_ID           -> coordinator port (unless JAX_COORDINATOR_PORT)
#   SLURM_STEP_NODELIST    -> coordinator host: the step's first node
#   SLURM_NTASKS           -> number of processes
#   SLURM_PROCID           -> this process's index
#   SLURM_LOCALID          -> the one local GPU this process drives
# so every task must see ALL GPUs of its node (SLURM_LOCALID indexes them):
# ask for --gpus-per-node, never --gpus-per-task, and one task per GPU.
# The run directory must be on a filesystem every node sees.
#
# usage (from the repo root, with the venv made on the shared filesystem:
#   python3 -m venv .venv && .venv/bin/pip install 'jax[cuda12]' -e .):
#   sbatch --nodes=2 scripts/launch_slurm_gpu.sh train \
#       --config configs/presets/qwen25_7b.py --workdir /shared/runs/q7b
#   # a sweep as a job array, one point per array task, then the summary:
#   n=$(.venv/bin/sft-jax sweep experiments/qwen25_7b_full_mix.py \
#         --workdir /shared/sweeps/q7b --list | wc -l)
#   sbatch --nodes=2 --array=0-$((n - 1)) scripts/launch_slurm_gpu.sh \
#       sweep experiments/qwen25_7b_full_mix.py --workdir /shared/sweeps/q7b
#   .venv/bin/sft-jax sweep experiments/qwen25_7b_full_mix.py \
#       --workdir /shared/sweeps/q7b --summary-only
# Resubmitting the same command resumes: train restarts from the run's last
# checkpoint, and finished sweep points are skipped. SLURM's --signal sends
# SIGTERM before the time limit, so train checkpoints and exits with code 75,
# on which the job requeues itself.
#
#SBATCH --job-name=sft-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from the spool; SLURM_SUBMIT_DIR is the
# repo root it was submitted from.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

sub="${1:-}"
shift || true

# Each process owns one GPU; let it take most of that GPU's memory up front.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# Overlap collectives with compute.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
# One array task per sweep point: jobs sharing nodes would share the port.
export JAX_COORDINATOR_PORT="${JAX_COORDINATOR_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export TOKENIZERS_PARALLELISM=false
# NCCL: set the interface / InfiniBand HCA if the cluster needs them, e.g.
#   export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5
# Gated models (Llama) need HF_TOKEN; HF_HOME should be node-local or
# pre-populated (then HF_HUB_OFFLINE=1) so 16 processes do not race on it.

case "$sub" in
  train)
    # Exit code 75: preempted after a checkpoint; requeue to resume.
    srun --kill-on-bad-exit=1 .venv/bin/sft-jax train --no-progress "$@" || {
      rc=$?
      if [ "$rc" = 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        scontrol requeue "$SLURM_JOB_ID"
      fi
      exit "$rc"
    }
    ;;
  sweep)
    # Every task runs the sweep runner for this array task's point; each
    # runner starts that point's train process, which inherits the SLURM
    # variables above, so together they form one multi-node job.
    srun --kill-on-bad-exit=1 .venv/bin/sft-jax sweep "$@" \
        --index "${SLURM_ARRAY_TASK_ID:?submit sweeps with --array}" \
        -- --no-progress
    ;;
  *)
    sed -n '2,35p' "$0"
    exit 2
    ;;
esac
