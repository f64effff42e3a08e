#!/usr/bin/env bash
# The first one-hour recipe (before --freeze 5 at 160 px): the 128 px same-budget recipe trained three times on every person (seeds 0, 1, 2), then a
# flip-TTA soft vote of the three models.
# Variables: DATA (folder with train/ and eval/), WEIGHTS (efficientnet_lite0 weights), OUT (new folder).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/one_hour}" "${SEED:=0}"
for member in 0 1 2; do
    python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name "seed$((SEED + member))" \
        --seed "$((SEED + member))" --val_ratio 0 --model efficientnet_lite0 --pretrained "$WEIGHTS" \
        --resize 128 128 --crop 1 1 --kind three_head --dataset MultiLabelDataset --criterion focal \
        --head_weights age=1.5 --age_soft 3 --epochs 3 --batch_size 64 --optimizer adamw --lr 1e-3 \
        --scheduler cosine --ema 0.999 --cache --cache_dir "$OUT/cache" --num_workers 0 --report off
done
python ensemble.py "$OUT/seed$SEED" "$OUT/seed$((SEED + 1))" "$OUT/seed$((SEED + 2))" --data_dir "$DATA/eval" \
    --tta hflip --output_dir "$OUT" --name submission.csv --num_workers 0
