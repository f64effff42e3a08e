#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe (same_budget.sh) with one stage fewer
# trained (--freeze 4: stages 3-6 and the head; stage 2 keeps its ImageNet weights too), for speed.
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--freeze 4 ${TRAIN_FLAGS:-}" exec bash "$(dirname "$0")/../same_budget.sh"
