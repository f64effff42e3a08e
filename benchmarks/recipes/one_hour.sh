#!/usr/bin/env bash
# One-hour recipe: the same-budget recipe (same_budget.sh: the face-pretrained MobileNetV1, --freeze 4,
# --layer_decay 0.75, 160x160, 3 epochs) trained four times on every person (seeds 0, 1, 2, 3), then a
# flip-TTA soft vote of the four models. The earlier lite0 vote is the candidate one_hour_lite0.
# Variables: DATA (folder with train/ and eval/), FACE (the face backbone's local-dir folder), OUT (new
# folder), MEMBERS (seed offsets of the members), TRAIN_FLAGS (more train.py flags; where they repeat one,
# theirs win).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${FACE:=../shared/weights/faceres_vggface2_mobilenetv1}"
: "${OUT:=model/one_hour}" "${SEED:=0}" "${MEMBERS:=0 1 2 3}" "${TRAIN_FLAGS:=}"
members=()
for member in $MEMBERS; do
    python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name "seed$((SEED + member))" \
        --seed "$((SEED + member))" --val_ratio 0 --model "local-dir:$FACE" --resize 160 160 --crop 1 1 \
        --freeze 4 --layer_decay 0.75 --kind three_head --dataset MultiLabelDataset --criterion focal \
        --head_weights age=1.5 --age_soft 3 --epochs 3 --batch_size 64 --optimizer adamw --lr 1e-3 \
        --scheduler cosine --ema 0.999 --cache --cache_dir "$OUT/cache" --num_workers 0 --report off \
        $TRAIN_FLAGS
    members+=("$OUT/seed$((SEED + member))")
done
python ensemble.py "${members[@]}" --data_dir "$DATA/eval" --tta hflip --output_dir "$OUT" \
    --name submission.csv --num_workers 0
