#!/usr/bin/env bash
# Candidate (the kept same-budget recipe until 2026-12-02; same_budget.sh now trains the face backbone):
# the same-budget recipe on ImageNet efficientnet_lite0: every person trains one model for
# 3 epochs at 160x160 (utkmask's native size) with no centre crop and the backbone's stem and first two
# stages frozen (--freeze 5: about 1.9x the training speed on a CPU), three heads with focal loss and soft
# age targets, scored with a moving average of its weights (--ema), predicted with flip TTA.
# Variables: DATA (folder with train/ and eval/), WEIGHTS (efficientnet_lite0 weights), OUT (new folder),
# TRAIN_FLAGS (more train.py flags; where they repeat a flag above, theirs win).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/same_budget}" "${SEED:=0}" "${TRAIN_FLAGS:=}"
python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name samebudget --seed "$SEED" \
    --val_ratio 0 --model efficientnet_lite0 --pretrained "$WEIGHTS" --resize 160 160 --crop 1 1 \
    --freeze 5 --kind three_head --dataset MultiLabelDataset --criterion focal --head_weights age=1.5 \
    --age_soft 3 --epochs 3 --batch_size 64 --optimizer adamw --lr 1e-3 --scheduler cosine --ema 0.999 \
    --cache --cache_dir "$OUT/cache" --num_workers 0 --report off $TRAIN_FLAGS
python inference.py --model_dir "$OUT" --data_dir "$DATA/eval" --tta hflip \
    --output_dir "$OUT" --name submission.csv --num_workers 0
