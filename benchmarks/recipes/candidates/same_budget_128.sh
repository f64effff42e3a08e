#!/usr/bin/env bash
# The first same-budget recipe (before --freeze 5 at 160 px; the wall time of the plain reference): every person trains one model for
# 3 epochs at 128x128 with no centre crop, three heads with focal loss and soft age targets, scored with
# a moving average of its weights (--ema), predicted with flip TTA.
# Variables: DATA (folder with train/ and eval/), WEIGHTS (efficientnet_lite0 weights), OUT (new folder),
# TRAIN_FLAGS (more train.py flags; where they repeat a flag above, theirs win).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/same_budget}" "${SEED:=0}" "${TRAIN_FLAGS:=}"
python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name samebudget --seed "$SEED" \
    --val_ratio 0 --model efficientnet_lite0 --pretrained "$WEIGHTS" --resize 128 128 --crop 1 1 \
    --kind three_head --dataset MultiLabelDataset --criterion focal --head_weights age=1.5 --age_soft 3 \
    --epochs 3 --batch_size 64 --optimizer adamw --lr 1e-3 --scheduler cosine --ema 0.999 \
    --cache --cache_dir "$OUT/cache" --num_workers 0 --report off $TRAIN_FLAGS
python inference.py --model_dir "$OUT" --data_dir "$DATA/eval" --tta hflip \
    --output_dir "$OUT" --name submission.csv --num_workers 0
