#!/usr/bin/env bash
# DirMoE medium: ~3.9B parameters total (~0.7B active per token at k=1), E=8 experts, k=1,
# on two nodes of 8 GPUs (TP 2 + sequence parallel within a node, PP 1, EP 8, data parallel 8;
# expert grid ETP 1 x EP 8 x expert-data-parallel 2).
#
#   sbatch slurm/medium.sh                         # train (resumes from its checkpoints)
#   DRY_RUN=1 bash slurm/medium.sh                 # print the resolved launch, check the layout
#   TRAIN_ITERS=1000 DATA_PATH=/data/pile_text_document sbatch slurm/medium.sh
#
# Knobs: the block below plus those of slurm/common.sh; all documented in slurm/README.md.
#SBATCH --job-name=dirmoe-medium
#SBATCH --nodes=2
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
RUN_NAME=${RUN_NAME:-dirmoe-medium-k$TARGET_K}
NUM_LAYERS=${NUM_LAYERS:-24}
HIDDEN_SIZE=${HIDDEN_SIZE:-1536}
NUM_ATTENTION_HEADS=${NUM_ATTENTION_HEADS:-16}
NUM_EXPERTS=${NUM_EXPERTS:-8}
MOE_FFN_HIDDEN_SIZE=${MOE_FFN_HIDDEN_SIZE:-4096}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
TP=${TP:-2}
PP=${PP:-1}
EP=${EP:-8}
# ----------------------------------------------------------------------------------------------

# sbatch runs a spooled copy of this file: find slurm/common.sh beside the submitted one.
_submitted=$({ [[ -n ${SLURM_JOB_ID:-} ]] && scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p'; } || echo "${BASH_SOURCE[0]}")
DIRMOE_HOME=${DIRMOE_HOME:-$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$_submitted")/.." && pwd)}
source "$DIRMOE_HOME/slurm/common.sh"
dirmoe_main "$@"
