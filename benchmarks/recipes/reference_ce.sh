#!/usr/bin/env bash
# The better fair reference of bench_quality.py (ref_18class_ce_image_split_nocrop) given the same data
# handling as the same-budget recipe: one 18-class head, plain cross entropy, AdamW lr 1e-3 + cosine,
# 128x128 with no centre crop, 3 epochs, batch 64, every person trained on, flip TTA.
# Variables: DATA (folder with train/ and eval/), WEIGHTS (efficientnet_lite0 weights), OUT (new folder).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/reference_ce}" "${SEED:=0}"
python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name reference_ce --seed "$SEED" \
    --val_ratio 0 --model efficientnet_lite0 --pretrained "$WEIGHTS" --resize 128 128 --crop 1 1 \
    --kind single_head --dataset MaskBaseDataset --criterion cross_entropy \
    --epochs 3 --batch_size 64 --optimizer adamw --lr 1e-3 --scheduler cosine \
    --cache --cache_dir "$OUT/cache" --num_workers 0 --report off
python inference.py --model_dir "$OUT" --data_dir "$DATA/eval" --tta hflip \
    --output_dir "$OUT" --name submission.csv --num_workers 0
