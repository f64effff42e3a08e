#!/usr/bin/env bash
# The lite0 one-hour recipe (benchmarks/recipes/one_hour.sh until 2026-12-02): the lite0 same-budget
# recipe (160x160, --freeze 5) trained four times on every person (seeds 0, 1, 2, 3), then a flip-TTA soft
# vote of the four models.
# Variables: DATA (folder with train/ and eval/), WEIGHTS (efficientnet_lite0 weights), OUT (new folder),
# MEMBERS (seed offsets of the members), TRAIN_FLAGS (more train.py flags; where they repeat one, theirs win).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/one_hour}" "${SEED:=0}" "${MEMBERS:=0 1 2 3}" "${TRAIN_FLAGS:=}"
members=()
for member in $MEMBERS; do
    python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name "seed$((SEED + member))" \
        --seed "$((SEED + member))" --val_ratio 0 --model efficientnet_lite0 --pretrained "$WEIGHTS" \
        --resize 160 160 --crop 1 1 --freeze 5 --kind three_head --dataset MultiLabelDataset \
        --criterion focal --head_weights age=1.5 --age_soft 3 --epochs 3 --batch_size 64 --optimizer adamw \
        --lr 1e-3 --scheduler cosine --ema 0.999 --cache --cache_dir "$OUT/cache" --num_workers 0 --report off \
        $TRAIN_FLAGS
    members+=("$OUT/seed$((SEED + member))")
done
python ensemble.py "${members[@]}" --data_dir "$DATA/eval" --tta hflip --output_dir "$OUT" \
    --name submission.csv --num_workers 0
