#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same budget spent on two models instead of one: the
# same-budget recipe (160x160, --freeze 5) trained twice for 2 epochs instead of once for 3 (seeds SEED and
# SEED + 100), then a flip-TTA soft vote of the two.
# Variables: those of one_hour.sh.
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/same_budget_pair}" "${SEED:=0}"
members=()
for member in 0 100; do
    python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name "seed$((SEED + member))" \
        --seed "$((SEED + member))" --val_ratio 0 --model efficientnet_lite0 --pretrained "$WEIGHTS" \
        --resize 160 160 --crop 1 1 --freeze 5 --kind three_head --dataset MultiLabelDataset \
        --criterion focal --head_weights age=1.5 --age_soft 3 --epochs 2 --batch_size 64 --optimizer adamw \
        --lr 1e-3 --scheduler cosine --ema 0.999 --cache --cache_dir "$OUT/cache" --num_workers 0 --report off
    members+=("$OUT/seed$((SEED + member))")
done
python ensemble.py "${members[@]}" --data_dir "$DATA/eval" --tta hflip --output_dir "$OUT" \
    --name submission.csv --num_workers 0
