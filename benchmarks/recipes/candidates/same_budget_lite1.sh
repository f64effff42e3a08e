#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe on efficientnet_lite1
# (the shared weights beside WEIGHTS' file).
# Variables: those of same_budget.sh.
: "${WEIGHTS:=../shared/weights/efficientnet_lite0.safetensors}"
TRAIN_FLAGS="--model efficientnet_lite1 --pretrained $(dirname "$WEIGHTS")/efficientnet_lite1.safetensors" \
    exec bash "$(dirname "$0")/../same_budget.sh"
