#!/usr/bin/env bash
# Same-budget recipe (within the wall time of the plain reference): every person trains one model for
# 3 epochs at 160x160 (utkmask's native size) with no centre crop, on the face-pretrained MobileNetV1
# (VGGFace2 identities; its own mean and std) with its stem and first two groups frozen (--freeze 4) and
# each shallower block's lr a further 0.75x (--layer_decay 0.75: the face features are already good),
# three heads with focal loss and soft age targets, scored with a moving average of its weights (--ema),
# predicted with flip TTA. The earlier ImageNet efficientnet_lite0 recipe is the candidate same_budget_lite0.
# Variables: DATA (folder with train/ and eval/), FACE (the face backbone's local-dir folder), OUT (new
# folder), TRAIN_FLAGS (more train.py flags; where they repeat a flag above, theirs win), INFER_FLAGS (more
# inference.py flags, e.g. --checkpoint avg).
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${FACE:=../shared/weights/faceres_vggface2_mobilenetv1}"
: "${OUT:=model/same_budget}" "${SEED:=0}" "${TRAIN_FLAGS:=}" "${INFER_FLAGS:=}"
python train.py --data_dir "$DATA/train" --model_dir "$OUT" --name samebudget --seed "$SEED" \
    --val_ratio 0 --model "local-dir:$FACE" --resize 160 160 --crop 1 1 --freeze 4 --layer_decay 0.75 \
    --kind three_head --dataset MultiLabelDataset --criterion focal --head_weights age=1.5 \
    --age_soft 3 --epochs 3 --batch_size 64 --optimizer adamw --lr 1e-3 --scheduler cosine --ema 0.999 \
    --cache --cache_dir "$OUT/cache" --num_workers 0 --report off $TRAIN_FLAGS
python inference.py --model_dir "$OUT" --data_dir "$DATA/eval" --tta hflip \
    --output_dir "$OUT" --name submission.csv --num_workers 0 $INFER_FLAGS
