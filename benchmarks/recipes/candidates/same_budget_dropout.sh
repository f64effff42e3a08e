#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe (same_budget.sh) with dropout 0.2 on the
# pooled features before each head (--drop_rate 0.2; the original EfficientNet-Lite0's classifier dropout).
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--drop_rate 0.2 ${TRAIN_FLAGS:-}" exec bash "$(dirname "$0")/../same_budget.sh"
