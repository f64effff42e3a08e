#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with wider soft age targets
# (a Gaussian of 6 years over the groups instead of 3).
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--age_soft 6" exec bash "$(dirname "$0")/same_budget_128.sh"
