#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with layer-wise lr decay 0.9
# (the heads at --lr, each backbone layer below at 0.9 times the one above: the stem at 0.17x).
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--layer_decay 0.9" exec bash "$(dirname "$0")/same_budget_128.sh"
