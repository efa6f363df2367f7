#!/usr/bin/env bash
# DirMoE small: ~0.95B parameters total (~0.22B active per token at k=1), E=8 experts, k=1,
# on one node of 8 GPUs (TP 1, PP 1, EP 8: one expert per GPU, data parallel 8).
#
#   sbatch slurm/small.sh                         # train (resumes from its checkpoints)
#   DRY_RUN=1 bash slurm/small.sh                 # print the resolved launch, check the layout
#   TRAIN_ITERS=1000 DATA_PATH=/data/pile_text_document sbatch slurm/small.sh
#
# Knobs: the block below plus those of slurm/common.sh; all documented in slurm/README.md.
#SBATCH --job-name=dirmoe-small
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

# ---- configuration: edit here or override from the environment -----------------------------
TARGET_K=${TARGET_K:-1}                 # DirMoE target active experts per token
RUN_NAME=${RUN_NAME:-dirmoe-small-k$TARGET_K}
NUM_LAYERS=${NUM_LAYERS:-12}
HIDDEN_SIZE=${HIDDEN_SIZE:-1024}
NUM_ATTENTION_HEADS=${NUM_ATTENTION_HEADS:-16}
NUM_EXPERTS=${NUM_EXPERTS:-8}
MOE_FFN_HIDDEN_SIZE=${MOE_FFN_HIDDEN_SIZE:-2816}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}
# ----------------------------------------------------------------------------------------------

# sbatch runs a spooled copy of this file: find slurm/common.sh beside the submitted one.
_submitted=$({ [[ -n ${SLURM_JOB_ID:-} ]] && scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p'; } || echo "${BASH_SOURCE[0]}")
DIRMOE_HOME=${DIRMOE_HOME:-$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$_submitted")/.." && pwd)}
source "$DIRMOE_HOME/slurm/common.sh"
dirmoe_main "$@"
