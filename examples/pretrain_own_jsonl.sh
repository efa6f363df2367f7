#!/usr/bin/env bash
# Pretrain DirMoE on your own JSONL, then resume from the checkpoint.
#
#   bash examples/pretrain_own_jsonl.sh [your.jsonl] [work dir]   # default work dir runs/own_jsonl
#
# 1. Your data: one JSON object per line with the document under "text" (`--json-key` picks another
#    field; plain text and .gz work too, see docs/DATA.md). Without an argument the script writes
#    a stand-in, <work>/my_corpus.jsonl, from 400 documents of the corpus shipped in the package.
# 2. `dirmoe-preprocess` tokenises it into Megatron's indexed format
#    (<work>/data/<name>_text_document.{bin,idx}) with the tokenizer shipped in the package, and
#    prints the flags to train with. With a tokenizer of your own, add `--tokenizer-model tok.model`
#    (SentencePiece, or a Hugging Face tokenizer folder) to that line; or let it train a
#    SentencePiece model on the inputs first: VOCAB=8192 bash examples/pretrain_own_jsonl.sh
# 3. `dirmoe-pretrain --preset tiny --data-path ...` trains with TensorBoard logs in <work>/tb
#    (plot the routing metrics with examples/plot_routing_metrics.py <work>/tb). The first run stops
#    half way (`--exit-interval`, as a preempted job would); the second, the same command without
#    it, resumes from <work>/ckpt at that iteration and finishes.
#
# Sizes: ITERS (default 200) iterations of the tiny preset (4 layers, hidden 128, 8 experts;
# 50 s on 2 idle CPU cores); extra dirmoe-pretrain flags in PRETRAIN_FLAGS (e.g. "--num-layers 2").
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v dirmoe-pretrain >/dev/null 2>&1 && [ -x "$repo/.venv/bin/dirmoe-pretrain" ]; then
  PATH="$repo/.venv/bin:$PATH"  # made by scripts/setup_venv.sh
fi
input="${1:-}"
work="${2:-runs/own_jsonl}"
iters="${ITERS:-200}"
half=$((iters / 2))
mkdir -p "$work/data"

# 1. A JSONL file (stand-in for yours).
if [ -z "$input" ]; then
  input="$work/my_corpus.jsonl"
  python - "$input" <<'EOF'
import gzip, json, sys
from megatron_dirmoe.data.corpus import asset_path

with gzip.open(asset_path("shakespeare.jsonl.gz"), "rt") as src, open(sys.argv[1], "w") as out:
    for i, line in zip(range(400), src):
        out.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
EOF
  echo "wrote $input"
fi
name="$(basename "$input")"
name="${name%%.*}"

# 2. Tokenise. The last line of its output is "train with: --data-path ... --tokenizer-type ...".
tokenizer=()
if [ -n "${VOCAB:-}" ]; then
  tokenizer=(--tokenizer-model "$work/data/${name}_sp${VOCAB}.model" --train-tokenizer "$VOCAB")
  rm -f "$work/data/${name}_sp${VOCAB}.model"
fi
dirmoe-preprocess --input "$input" --output-prefix "$work/data/$name" --workers 2 --no-progress \
  "${tokenizer[@]}" | tee "$work/preprocess.log"
read -r -a data_flags <<<"$(sed -n 's/^train with: //p' "$work/preprocess.log")"

# 3. Train, stop half way, rerun: it resumes from the checkpoint.
pretrain() {
  # --split: train/valid/test shares of the documents of the one --data-path.
  dirmoe-pretrain --preset tiny "${data_flags[@]}" --split 90,5,5 --train-iters "$iters" \
    --save "$work/ckpt" --load "$work/ckpt" --tensorboard-dir "$work/tb" --moe-per-layer-logging \
    ${PRETRAIN_FLAGS:-} "$@"
}
pretrain --exit-interval "$half"
echo "--- rerun: resumes at iteration $(cat "$work/ckpt/latest_checkpointed_iteration.txt")"
pretrain
