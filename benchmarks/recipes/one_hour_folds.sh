#!/usr/bin/env bash
# One-hour candidate: 3 folds over people (every person trains 2 of the 3 members and is out-of-fold
# once), 160x160 (utkmask's native size, no centre crop), three heads with focal loss and soft age
# targets, then a flip-TTA soft vote of the folds with offsets fitted on the out-of-fold probabilities.
# Variables: DATA (folder with train/ and eval/), WEIGHTS (efficientnet_lite0 weights), OUT (new folder).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
: "${OUT:=model/one_hour_folds}" "${SEED:=0}"
python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name folds --seed "$SEED" \
    --n_folds 3 --model efficientnet_lite0 --pretrained "$WEIGHTS" --resize 160 160 --crop 1 1 \
    --kind three_head --dataset MultiLabelDataset --criterion focal --head_weights age=1.5 --age_soft 3 \
    --epochs 3 --batch_size 64 --optimizer adamw --lr 1e-3 --scheduler cosine \
    --cache --cache_dir "$OUT/cache" --num_workers 0 --report off
python ensemble.py "$(ls -t "$OUT"/folds*_cv.json | head -1)" --data_dir "$DATA/eval" --tta hflip \
    --calibrate --output_dir "$OUT" --name submission.csv --num_workers 0
