#!/usr/bin/env bash
# DirMoE large: ~20.7B parameters total (~3.7B active per token at k=1), E=8 experts, k=1,
# on four nodes of 8 GPUs (TP 4 + sequence parallel, PP 2, EP 8, data parallel 4: 4 micro-batches
# per step; expert grid ETP 1 x EP 8 x expert-data-parallel 2 per pipeline stage).
#
#   sbatch slurm/large.sh                         # train (resumes from its checkpoints)
#   DRY_RUN=1 bash slurm/large.sh                 # print the resolved launch, check the layout
#   TRAIN_ITERS=1000 DATA_PATH=/data/pile_text_document sbatch slurm/large.sh
#
# Knobs: the block below plus those of slurm/common.sh; all documented in slurm/README.md.
#SBATCH --job-name=dirmoe-large
#SBATCH --nodes=4
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
RUN_NAME=${RUN_NAME:-dirmoe-large-k$TARGET_K}
NUM_LAYERS=${NUM_LAYERS:-32}
HIDDEN_SIZE=${HIDDEN_SIZE:-3072}
NUM_ATTENTION_HEADS=${NUM_ATTENTION_HEADS:-24}
NUM_EXPERTS=${NUM_EXPERTS:-8}
MOE_FFN_HIDDEN_SIZE=${MOE_FFN_HIDDEN_SIZE:-8192}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
TP=${TP:-4}
PP=${PP:-2}
EP=${EP:-8}
# ----------------------------------------------------------------------------------------------

# sbatch runs a spooled copy of this file: find slurm/common.sh beside the submitted one.
_submitted=$({ [[ -n ${SLURM_JOB_ID:-} ]] && scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p'; } || echo "${BASH_SOURCE[0]}")
DIRMOE_HOME=${DIRMOE_HOME:-$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$_submitted")/.." && pwd)}
source "$DIRMOE_HOME/slurm/common.sh"
dirmoe_main "$@"
