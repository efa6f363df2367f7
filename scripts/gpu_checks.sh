#!/usr/bin/env bash
# Every GPU check of the project in one run, on one GPU, within about 9 minutes: the GPU test
# suite, the router / MoE-layer / end-to-end benchmarks against Megatron's TopKRouter, a
# one-GPU torchrun of the entry point, one process without a launcher, MTP with DirMoE layers,
# the torch build chosen for the driver, and the dry run of every Slurm script.
#
#   bash scripts/gpu_checks.sh [RESULTS_DIR]        # default $OUT, else ./gpu_results
#
# Needs megatron-core (and Transformer Engine for the TE numbers) importable; each step's log
# lands in RESULTS_DIR/<step>.log and its exit status in RESULTS_DIR/summary.txt. A failing step
# does not stop the others. STEP_TIMEOUT (seconds, default 240) bounds each step.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
python=${PYTHON:-python3}
: > "$out/summary.txt"

step() {
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-240}" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${SECONDS}s-${t0}s" | tee -a "$out/summary.txt"
  tail -n 20 "$out/$name.log"
}

"$python" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' | tee "$out/device.txt"
step pytest_gpu "$python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
step bench_router "$python" scripts/bench_router.py --device cuda --tokens 32768 --hidden 1024 \
  --experts 8 64 --iters 50 --warmup 10
step bench_moe_layer "$python" scripts/bench_moe_layer.py --device cuda --tokens 32768 \
  --hidden 1024 --experts 8 --ffn-hidden 2816 --target-k 1
# DirMoE at the default settings and two candidates, TopK at the winner's: four trainings.
STEP_TIMEOUT=360 step bench_e2e "$python" scripts/bench_e2e.py --size small --steps 20 \
  --log-interval 10 --variant mbs16="--micro-batch-size 16" \
  --variant permute-fusion="--moe-permute-fusion" --json "$out/bench_e2e.json"
step torchrun_1gpu "$python" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m megatron_dirmoe.pretrain --preset tiny --dirmoe-device cuda --train-iters 20 \
  --log-interval 5 --eval-interval 20 --save "$out/tiny_ckpt" --load "$out/tiny_ckpt"
# One process on one GPU with no launcher (WORLD_SIZE unset): the entry point sets the rendezvous.
step one_gpu_no_launcher env -u WORLD_SIZE -u RANK -u LOCAL_RANK -u MASTER_ADDR -u MASTER_PORT \
  "$python" -m megatron_dirmoe.pretrain --preset tiny --dirmoe-device cuda --train-iters 10 \
  --log-interval 5 --eval-interval 10 --save "$out/no_launcher_ckpt" --load "$out/no_launcher_ckpt"
# Multi-token prediction with DirMoE MoE layers on megatron.training's CUDA path.
step mtp_1gpu "$python" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m megatron_dirmoe.pretrain --preset tiny --dirmoe-device cuda --mtp-num-layers 1 \
  --train-iters 20 --log-interval 5 --eval-interval 20 --save "$out/mtp_ckpt" --load "$out/mtp_ckpt"
# Which torch build setup_venv.sh would install for this node's driver (empty: the lock's).
step install_plan "$python" scripts/install_plan.py torch-index
for script in slurm/small.sh slurm/small_k2.sh slurm/medium.sh slurm/large.sh; do
  step "dry_run_$(basename "$script" .sh)" env DRY_RUN=1 PYTHON="$python" bash "$script"
done
echo "results in $out"; cat "$out/summary.txt"
