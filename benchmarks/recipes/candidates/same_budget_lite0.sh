#!/usr/bin/env bash
# Candidate (the kept same-budget recipe until 2026-12-02; same_budget.sh now trains the face backbone):
# same_budget.sh on ImageNet efficientnet_lite0 with its stem and first two stages frozen (--freeze 5:
# about 1.9x the training speed on a CPU) and every group at the full lr (--layer_decay 1, bit-identical
# to none); the rest as same_budget.sh (160x160, 3 epochs, three heads, focal, soft age, --ema, flip TTA).
# Variables: those of same_budget.sh, and WEIGHTS (efficientnet_lite0 weights).
: "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
TRAIN_FLAGS="--model efficientnet_lite0 --pretrained $WEIGHTS --freeze 5 --layer_decay 1 ${TRAIN_FLAGS:-}" \
    exec bash "$(dirname "$0")/../same_budget.sh"
