# shellcheck shell=bash
# Shared logic of the DirMoE sbatch scripts (small.sh, medium.sh, large.sh, small_k2.sh).
# Sourced by them after they set their model and layout; never run on its own. Every knob below
# is "VAR=${VAR:-default}": export VAR (or pass it on the sbatch line with --export=ALL,VAR=...)
# to override it. slurm/README.md documents each one.
#
# What it does, in order (dirmoe_main):
#   1. resolve the world: nodes x GPUs per node from SLURM_* (or, for DRY_RUN=1 outside Slurm,
#      from the script's #SBATCH header), MASTER_ADDR/MASTER_PORT for torch.distributed;
#   2. build the `python -m megatron_dirmoe.pretrain` arguments and the srun command
#      (one task per GPU; RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS);
#   3. check the layout and batch arithmetic (python -m megatron_dirmoe.launch check) and stop
#      before any GPU work if it cannot run; with DRY_RUN=1 print everything and stop here;
#   4. train: --save and --load point at the same directory, so a rerun resumes from
#      latest_checkpointed_iteration.txt;
#   5. on the deadline signal (#SBATCH --signal=B:USR1@N) forward SIGTERM to the ranks, which
#      checkpoint and exit (--exit-signal-handler); --exit-duration-in-mins is a second guard;
#      if training stopped early with progress, `scontrol requeue` the job so it resumes.

# ---------------------------------------------------------------- shared knobs (env overrides)
# Where things live.
RUN_NAME=${RUN_NAME:-dirmoe}
RUN_ROOT=${RUN_ROOT:-$DIRMOE_HOME/runs}
RUN_DIR=${RUN_DIR:-$RUN_ROOT/$RUN_NAME}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$RUN_DIR/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}
DATA_PATH=${DATA_PATH:-}              # Megatron --data-path (weights and prefixes, space separated)
DATA_SPLIT=${DATA_SPLIT:-969,30,1}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-}    # e.g. HuggingFaceTokenizer, SentencePieceTokenizer
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}

# Optimisation (the paper's Table 3). GLOBAL_BATCH_SIZE is in sequences per optimizer step.
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-32}
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}                # cosine decays to 0.1 x LR
LR_WARMUP_FRACTION=${LR_WARMUP_FRACTION:-0.01}
WEIGHT_DECAY=${WEIGHT_DECAY:-1e-2}
CLIP_GRAD=${CLIP_GRAD:-1.0}
SEED=${SEED:-1234}
TRAIN_ITERS=${TRAIN_ITERS:-60000}

# Router: the DirMoE schedules and priors keep the defaults of megatron_dirmoe/config.py
# (tau 2.0 -> 0.3, prior scale 0.5 -> 0.3, ...); DIRMOE_ARGS adds or overrides --dirmoe-* flags.
TARGET_K=${TARGET_K:-1}
DIRMOE_ARGS=${DIRMOE_ARGS:-}

# Run control.
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
EVAL_ITERS=${EVAL_ITERS:-10}
EXTRA_ARGS=${EXTRA_ARGS:-}            # appended to the pretrain arguments (word-split)
REQUEUE=${REQUEUE:-1}                 # requeue when training stopped early with progress
EXIT_MARGIN_MINS=${EXIT_MARGIN_MINS:-15}  # --exit-duration-in-mins = time left - this ("" or 0: off)
DRY_RUN=${DRY_RUN:-0}                 # 1: print the resolved command and stop

# Device and launch.
DEVICE=${DEVICE:-gpu}                 # gpu | cpu (cpu: one process, for PRESET=tiny tests)
PRESET=${PRESET:-}                    # e.g. tiny: model, batch and lr from the preset
PYTHON=${PYTHON:-python3}             # interpreter that runs training (inside the container)
CHECK_PYTHON=${CHECK_PYTHON:-}        # interpreter for the launch check on the batch host
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}  # pyxis/enroot image, e.g. nvcr.io#nvidia/pytorch:25.10-py3
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}  # extra pyxis mounts (data, tokenizer), comma separated
SRUN_ARGS=${SRUN_ARGS:-}              # extra srun flags (word-split)

# NCCL / CUDA (only set when the environment does not already).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP/SP overlap
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- helpers
dirmoe_log() { printf '[dirmoe-slurm] %s\n' "$*"; }
dirmoe_die() { printf '[dirmoe-slurm] error: %s\n' "$*" >&2; exit 2; }

# The value of "#SBATCH --<name>=<value>" in the submitted script (for DRY_RUN outside Slurm).
dirmoe_sbatch_directive() {
  local name=$1 script=$2
  sed -n "s/^#SBATCH[[:space:]]\{1,\}--${name}[=[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p" \
    "$script" | tail -n 1
}

# The last complete iteration under $CHECKPOINT_DIR (0 when there is none).
dirmoe_latest_iteration() {
  local tracker=$CHECKPOINT_DIR/latest_checkpointed_iteration.txt value
  if [[ -f $tracker ]]; then
    read -r value <"$tracker" || true
    if [[ $value =~ ^[0-9]+$ ]]; then
      printf '%d\n' "$((10#$value))"
      return
    fi
  fi
  printf '0\n'
}

# Resolve NNODES, GPUS_PER_NODE, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
dirmoe_resolve_world() {
  local script=$1
  if [[ $DEVICE == cpu ]]; then
    NNODES=1
    GPUS_PER_NODE=0
    WORLD_SIZE=1
  elif [[ -n ${SLURM_JOB_ID:-} ]]; then
    NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-}}}
    [[ -n $GPUS_PER_NODE ]] || dirmoe_die "cannot tell GPUs per node (set GPUS_PER_NODE)"
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
  else  # a dry run on a login node: read the request from the #SBATCH header
    NNODES=${NNODES:-$(dirmoe_sbatch_directive nodes "$script")}
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(dirmoe_sbatch_directive gpus-per-node "$script")}
    [[ $NNODES =~ ^[0-9]+$ && $GPUS_PER_NODE =~ ^[0-9]+$ ]] ||
      dirmoe_die "set NNODES and GPUS_PER_NODE (not found in $script's #SBATCH header)"
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
  fi
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    # sed reads the whole list: `head -n 1` can exit first and SIGPIPE scontrol (status 141
    # under pipefail, which stops the batch script).
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
  fi
  MASTER_ADDR=${MASTER_ADDR:-localhost}
  # One port per job (stable across requeues of the same job id), away from common services.
  MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
}

# Fill the array TRAIN_ARGS with the arguments of `python -m megatron_dirmoe.pretrain`.
dirmoe_build_args() {
  TRAIN_ARGS=()
  if [[ -n $PRESET ]]; then
    # The preset decides model size, batch and learning rate (e.g. tiny for CPU tests).
    TRAIN_ARGS+=(--preset "$PRESET")
  else
    TRAIN_ARGS+=(
      --num-layers "$NUM_LAYERS"
      --hidden-size "$HIDDEN_SIZE"
      --num-attention-heads "$NUM_ATTENTION_HEADS"
      --seq-length "$SEQ_LENGTH"
      --max-position-embeddings "$SEQ_LENGTH"
      --num-experts "$NUM_EXPERTS"
      --moe-ffn-hidden-size "$MOE_FFN_HIDDEN_SIZE"
      --ffn-hidden-size "$MOE_FFN_HIDDEN_SIZE"
      --micro-batch-size "$MICRO_BATCH_SIZE"
      --global-batch-size "$GLOBAL_BATCH_SIZE"
      --lr "$LR"
      --min-lr "$MIN_LR"
      --lr-decay-style cosine
      --lr-warmup-fraction "$LR_WARMUP_FRACTION"
      --weight-decay "$WEIGHT_DECAY"
      --clip-grad "$CLIP_GRAD"
    )
  fi
  TRAIN_ARGS+=(--seed "$SEED" --train-iters "$TRAIN_ITERS" --dirmoe-target-k "$TARGET_K")
  if [[ $DEVICE == cpu ]]; then
    TRAIN_ARGS+=(--dirmoe-device cpu)
  else
    TRAIN_ARGS+=(
      --dirmoe-device cuda
      --bf16
      --tensor-model-parallel-size "$TP"
      --pipeline-model-parallel-size "$PP"
      --expert-model-parallel-size "$EP"
      --expert-tensor-parallel-size "$ETP"
      --context-parallel-size "$CP"
      --moe-token-dispatcher-type alltoall
      --moe-grouped-gemm
      --use-distributed-optimizer
      --overlap-grad-reduce
      --overlap-param-gather
    )
    if ((TP > 1)); then
      TRAIN_ARGS+=(--sequence-parallel)  # Megatron's MoE layer needs it with TP > 1
    fi
  fi
  TRAIN_ARGS+=(
    --save "$CHECKPOINT_DIR"
    --load "$CHECKPOINT_DIR"
    --save-interval "$SAVE_INTERVAL"
    --log-interval "$LOG_INTERVAL"
    --eval-interval "$EVAL_INTERVAL"
    --eval-iters "$EVAL_ITERS"
    --tensorboard-dir "$TENSORBOARD_DIR"
    --exit-signal-handler
  )
  if [[ -n $DATA_PATH ]]; then
    local -a data_path
    read -r -a data_path <<<"$DATA_PATH"
    TRAIN_ARGS+=(--data-path "${data_path[@]}" --split "$DATA_SPLIT")
  fi
  [[ -z $TOKENIZER_TYPE ]] || TRAIN_ARGS+=(--tokenizer-type "$TOKENIZER_TYPE")
  [[ -z $TOKENIZER_MODEL ]] || TRAIN_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")
  local minutes
  minutes=$(dirmoe_exit_duration_mins)
  [[ -z $minutes ]] || TRAIN_ARGS+=(--exit-duration-in-mins "$minutes")
  local -a extra
  read -r -a extra <<<"$DIRMOE_ARGS $EXTRA_ARGS"
  TRAIN_ARGS+=("${extra[@]}")
}

# --exit-duration-in-mins from the job's time left (empty outside Slurm or without a limit).
dirmoe_exit_duration_mins() {
  [[ -n ${SLURM_JOB_ID:-} && -n $EXIT_MARGIN_MINS && $EXIT_MARGIN_MINS != 0 ]] || return 0
  local left seconds
  left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null) || return 0
  seconds=$(dirmoe_check_python -m megatron_dirmoe.launch seconds "$left") || return 0
  [[ -n $seconds ]] || return 0
  local minutes=$((seconds / 60 - EXIT_MARGIN_MINS))
  ((minutes > 0)) && printf '%d\n' "$minutes"
  return 0
}

# Run the launch check's Python: pure stdlib + the repository's package, no torch needed.
dirmoe_check_python() {
  local python=$CHECK_PYTHON
  if [[ -z $python ]]; then
    if [[ -n $CONTAINER_IMAGE ]]; then python=python3; else python=$PYTHON; fi
  fi
  PYTHONPATH="$DIRMOE_HOME${PYTHONPATH:+:$PYTHONPATH}" "$python" "$@"
}

# Fill the array LAUNCH with the srun command that starts every rank.
dirmoe_build_launch() {
  local -a srun_args
  if [[ $DEVICE == cpu ]]; then
    srun_args=(--nodes=1 --ntasks=1)
  else
    srun_args=(--nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1)
  fi
  # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05).
  [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  if [[ -n $CONTAINER_IMAGE ]]; then
    local mounts=$DIRMOE_HOME,$RUN_DIR
    [[ $CHECKPOINT_DIR == "$RUN_DIR"/* ]] || mounts+=,$CHECKPOINT_DIR
    [[ -z $CONTAINER_MOUNTS ]] || mounts+=,$CONTAINER_MOUNTS
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
      --container-workdir="$DIRMOE_HOME")
  fi
  local -a user_srun
  read -r -a user_srun <<<"$SRUN_ARGS"
  srun_args+=("${user_srun[@]}")
  # One task per GPU; each task takes its torch.distributed rank from Slurm.
  # shellcheck disable=SC2016  # expanded by the task's shell, not here
  local rank_env='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'
  LAUNCH=(srun "${srun_args[@]}" bash -c "$rank_env" dirmoe-rank
    "$PYTHON" -m megatron_dirmoe.pretrain "${TRAIN_ARGS[@]}")
}

dirmoe_print_plan() {
  local script=$1 latest
  latest=$(dirmoe_latest_iteration)
  dirmoe_log "script: $script (run $RUN_NAME, job ${SLURM_JOB_ID:-none}, restart ${SLURM_RESTART_COUNT:-0})"
  dirmoe_log "world: $NNODES node(s) x ${GPUS_PER_NODE} GPU(s) = $WORLD_SIZE rank(s) ($DEVICE)"
  dirmoe_log "checkpoints: $CHECKPOINT_DIR ($([[ $latest -gt 0 ]] &&
    echo "resumes from iteration $latest" || echo "none yet: starts from scratch"))"
  local var env_line="MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
  for var in CUDA_DEVICE_MAX_CONNECTIONS NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING \
    TORCH_NCCL_AVOID_RECORD_STREAMS; do
    env_line+=" $var=${!var}"
  done
  dirmoe_log "env: $env_line PYTHONPATH=$DIRMOE_HOME${PYTHONPATH:+:$PYTHONPATH}"
  dirmoe_log "arguments:"
  local i=0 line
  while ((i < ${#TRAIN_ARGS[@]})); do
    line=${TRAIN_ARGS[i]}
    ((i += 1))
    while ((i < ${#TRAIN_ARGS[@]})) && [[ ${TRAIN_ARGS[i]} != --* ]]; do
      line+=" ${TRAIN_ARGS[i]}"
      ((i += 1))
    done
    printf '    %s\n' "$line"
  done
  printf 'launch:'
  printf ' %q' "${LAUNCH[@]}"
  printf '\n'
}

# ---------------------------------------------------------------- signals
DIRMOE_STOP_SIGNAL=
_dirmoe_srun_pid=
dirmoe_on_signal() {
  DIRMOE_STOP_SIGNAL=$1
  dirmoe_log "got SIG$1: asking the ranks to checkpoint and exit (SIGTERM)"
  if [[ -n $_dirmoe_srun_pid ]]; then
    # Signal the tasks of every job step, not srun: srun answers SIGTERM by killing the step.
    scancel --signal=TERM "$SLURM_JOB_ID" || true
  fi
}

# ---------------------------------------------------------------- main
dirmoe_main() {
  local script=${DIRMOE_SCRIPT:-${BASH_SOURCE[-1]}}
  case $DEVICE in gpu | cpu) ;; *) dirmoe_die "DEVICE must be gpu or cpu, not '$DEVICE'" ;; esac
  TP=${TP:-1} PP=${PP:-1} EP=${EP:-1} ETP=${ETP:-1} CP=${CP:-1}
  # From here on a deadline or cancel signal is recorded instead of killing this shell.
  trap 'dirmoe_on_signal USR1' USR1
  trap 'dirmoe_on_signal TERM' TERM

  dirmoe_resolve_world "$script"
  dirmoe_build_args
  TRAIN_ARGS+=("$@")
  dirmoe_build_launch

  # 3. Refuse impossible layouts before any rank starts.
  dirmoe_check_python -m megatron_dirmoe.launch check --world-size "$WORLD_SIZE" -- "${TRAIN_ARGS[@]}" ||
    dirmoe_die "layout check failed; nothing was launched"
  dirmoe_print_plan "$script"
  if [[ $DRY_RUN == 1 ]]; then
    dirmoe_log "DRY_RUN=1: not launching"
    return 0
  fi
  [[ -n ${SLURM_JOB_ID:-} ]] || dirmoe_die "not inside a Slurm allocation: submit with sbatch (or DRY_RUN=1)"

  # 4. Train; save and load are the same directory, so this resumes.
  mkdir -p "$RUN_DIR" "$CHECKPOINT_DIR" "$TENSORBOARD_DIR"
  export MASTER_ADDR MASTER_PORT
  export PYTHONPATH="$DIRMOE_HOME${PYTHONPATH:+:$PYTHONPATH}"
  local start_iteration rc=0
  start_iteration=$(dirmoe_latest_iteration)
  if [[ -z $DIRMOE_STOP_SIGNAL ]]; then
    "${LAUNCH[@]}" &
    _dirmoe_srun_pid=$!
    # `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
    while true; do
      rc=0
      wait "$_dirmoe_srun_pid" || rc=$?
      kill -0 "$_dirmoe_srun_pid" 2>/dev/null || break
    done
    _dirmoe_srun_pid=
  else
    dirmoe_log "SIG$DIRMOE_STOP_SIGNAL arrived before the launch; not starting training"
  fi
  trap - USR1 TERM

  # 5. Finished, stopped early (requeue), or failed.
  local latest
  latest=$(dirmoe_latest_iteration)
  dirmoe_log "training exited with status $rc at checkpoint iteration $latest of $TRAIN_ITERS"
  if ((latest >= TRAIN_ITERS)); then
    dirmoe_log "done: $TRAIN_ITERS iterations trained"
    return 0
  fi
  if [[ $DIRMOE_STOP_SIGNAL == TERM ]]; then
    # Cancelled or preempted: Slurm requeues preempted --requeue jobs itself; a scancel must win.
    dirmoe_log "stopped by SIGTERM at iteration $latest; not requeueing"
    return "$((rc == 0 ? 143 : rc))"
  fi
  if [[ $DIRMOE_STOP_SIGNAL == USR1 ]] || { ((rc == 0)) && ((latest > start_iteration)); }; then
    if [[ $REQUEUE == 1 ]]; then
      local reason=${DIRMOE_STOP_SIGNAL:+deadline signal SIG$DIRMOE_STOP_SIGNAL}
      dirmoe_log "stopped early at iteration $latest (${reason:-exit duration}); requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID" || dirmoe_die "scontrol requeue failed: resubmit to resume"
      # Slurm now ends this run with a signal. Exiting on our own instead races the requeue
      # (measured: the job can end FAILED with the requeue lost), so wait to be stopped.
      sleep 300 &
      wait "$!" || true
      dirmoe_log "the requeue did not end this run within 300 s; exiting"
      return 0
    fi
    dirmoe_log "stopped early at iteration $latest; REQUEUE=$REQUEUE: resubmit to resume"
    return 0
  fi
  dirmoe_log "training failed (status $rc) at iteration $latest; not requeueing"
  return "$((rc == 0 ? 1 : rc))"
}
