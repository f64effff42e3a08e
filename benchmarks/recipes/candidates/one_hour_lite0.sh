#!/usr/bin/env bash
# Candidate (the kept one-hour recipe until 2026-12-02): one_hour.sh's four members (seeds 0-3) and flip-TTA
# soft vote on ImageNet efficientnet_lite0, each the lite0 same-budget recipe (same_budget_lite0.sh:
# --freeze 5, every group at the full lr).
# Variables: those of one_hour.sh, and WEIGHTS (efficientnet_lite0 weights).
: "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
TRAIN_FLAGS="--model efficientnet_lite0 --pretrained $WEIGHTS --freeze 5 --layer_decay 1 ${TRAIN_FLAGS:-}" \
    exec bash "$(dirname "$0")/../one_hour.sh"
