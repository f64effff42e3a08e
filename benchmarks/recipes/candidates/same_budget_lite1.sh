#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) on efficientnet_lite1
# (the shared weights beside WEIGHTS' file).
# Variables: those of same_budget_128.sh.
: "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
TRAIN_FLAGS="--model efficientnet_lite1 --pretrained $(dirname "$WEIGHTS")/efficientnet_lite1.safetensors" \
    exec bash "$(dirname "$0")/same_budget_128.sh"
