#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe (same_budget.sh) with albumentations'
# training augmentation (flip, shift-scale-rotate, brightness/contrast, hue/saturation, coarse dropout).
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--augmentation AlbumentationsAugmentation ${TRAIN_FLAGS:-}" exec bash "$(dirname "$0")/../same_budget.sh"
