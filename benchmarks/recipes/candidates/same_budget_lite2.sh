#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe (same_budget.sh: 160x160, --freeze 5) on
# efficientnet_lite2 (the shared weights beside WEIGHTS' file; about 1.6x lite0's work per pixel).
# Variables: those of same_budget.sh.
: "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
TRAIN_FLAGS="--model efficientnet_lite2 --pretrained $(dirname "$WEIGHTS")/efficientnet_lite2.safetensors" \
    exec bash "$(dirname "$0")/../same_budget.sh"
