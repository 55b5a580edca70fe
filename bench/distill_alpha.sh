#!/usr/bin/env bash
# α of baseline vs distilled drafters on the real SmolLM2-135M-Instruct + aclsum (issue 5).
# Usage: bash bench/distill_alpha.sh [OUT_DIR]   (from the repo root, venv active)
# Defaults are sized for a shared 2-core CPU (about 45 min there); raise TRAIN/NEW/STEPS/TEST on a real machine.
# Every step is a `fastspec` CLI command; /usr/bin/time records CPU seconds (user+sys) of each.
set -euo pipefail
OUT=${1:-fastspec_out/distill_alpha}
TRAIN=${TRAIN:-24}        # aclsum train abstracts for the pseudo-dataset / training
TEST=${TEST:-4}           # aclsum test abstracts for α
NEW=${NEW:-32}            # max_new_tokens (pseudo outputs and evaluation)
STEPS=${STEPS:-40}       # LSTM/CNN optimizer steps
GAMMA=${GAMMA:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
T="/usr/bin/time -a -o $OUT/cpu_times.txt -f"
run() { local name=$1; shift; echo "== $name: $*"; $T "$name %U %S %e" "$@"; }
FS="python -m fastspec.cli"
PSEUDO="$OUT/pseudo"

run pseudo $FS pseudo --target smollm2 --dataset aclsum --split train --num_samples $TRAIN --max_new_tokens $NEW \
  --batch_size 8 --topk_logits 64 --out "$PSEUDO" --no_progress
COMMON="--target smollm2 --output_root $OUT/runs --pseudo_dataset_path $PSEUDO --eval_samples 0 --no_progress"
run ngram_ref    $FS train --drafter ngram --exp_name ngram_ref    --ngram_n 3 --loss 1 --kd_loss 0 $COMMON
run ngram_pseudo $FS train --drafter ngram --exp_name ngram_pseudo --ngram_n 3 --loss 0 --kd_loss 1 $COMMON
NEURAL="--max_steps $STEPS --batch_size 8 --lr 5e-3 --warmup_steps 5 --ckpt_every 20 $COMMON"
run lstm_base $FS train --drafter lstm --exp_name lstm_base --loss 1 --kd_loss 0 $NEURAL
run lstm_kd   $FS train --drafter lstm --exp_name lstm_kd   --loss 0 --kd_loss 1 --distill_method fkl --teacher_logits cache $NEURAL
run cnn_base  $FS train --drafter cnn  --exp_name cnn_base  --loss 1 --kd_loss 0 $NEURAL
run cnn_kd    $FS train --drafter cnn  --exp_name cnn_kd    --loss 0 --kd_loss 1 --distill_method fkl --teacher_logits cache $NEURAL
R=$OUT/runs
run eval $FS eval --target smollm2 --dataset aclsum --split test --num_samples $TEST --max_new_tokens $NEW --gamma $GAMMA \
  --out "$OUT/eval" --no_progress --ckpt_path \
  "ngram-ref=$R/ngram_ref/drafter" "ngram-pseudo=$R/ngram_pseudo/drafter" \
  "lstm-base=$R/lstm_base/drafter" "lstm-kd=$R/lstm_kd/drafter" "cnn-base=$R/cnn_base/drafter" "cnn-kd=$R/cnn_kd/drafter"
cat "$OUT/cpu_times.txt"
