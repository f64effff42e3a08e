#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with MixUp (alpha 0.2) on half
# of the batches.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--mixup 0.2 --mix_prob 0.5" exec bash "$(dirname "$0")/same_budget_128.sh"
