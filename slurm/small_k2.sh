#!/usr/bin/env bash
# DirMoE small with k=2: slurm/small.sh with the router's target active experts per token k=2
# (max_active = min(E, 4k) = 8). Same model, layout and knobs; its own run directory.
#
#   sbatch slurm/small_k2.sh
#   DRY_RUN=1 bash slurm/small_k2.sh
#SBATCH --job-name=dirmoe-small-k2
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

TARGET_K=${TARGET_K:-2}

# sbatch runs a spooled copy of this file: find slurm/small.sh beside the submitted one.
_submitted=$({ [[ -n ${SLURM_JOB_ID:-} ]] && scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p'; } || echo "${BASH_SOURCE[0]}")
DIRMOE_HOME=${DIRMOE_HOME:-$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$_submitted")/.." && pwd)}
source "$DIRMOE_HOME/slurm/small.sh"
