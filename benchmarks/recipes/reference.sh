#!/usr/bin/env bash
# The plain reference a user could write without this toolkit's recipe (issue #11): one 18-class
# head, cross entropy with label smoothing 0.1, images split at random, the whole face resized to
# 128x128 (no centre crop), flip, AdamW lr 3e-4 + cosine, 3 epochs, batch 64, every person trained
# on (no validation), predicted without TTA. Its wall time is the same-budget recipe's budget.
# Variables: DATA (folder with train/ and eval/), WEIGHTS (efficientnet_lite0 weights), OUT (new folder).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/reference}" "${SEED:=0}"
python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name reference --seed "$SEED" \
    --val_ratio 0 --model efficientnet_lite0 --pretrained "$WEIGHTS" --resize 128 128 --crop 1 1 \
    --kind single_head --dataset MaskBaseDataset --criterion label_smoothing --smoothing 0.1 \
    --epochs 3 --batch_size 64 --optimizer adamw --lr 3e-4 --scheduler cosine \
    --cache --cache_dir "$OUT/cache" --num_workers 0 --report off
python inference.py --model_dir "$OUT" --data_dir "$DATA/eval" --tta none \
    --output_dir "$OUT" --name submission.csv --num_workers 0
