#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with plain cross entropy on
# the mask and gender heads (the age head keeps its soft targets).
# Measured before --ema joined the recipe: --ema 0 keeps it as measured.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--criterion cross_entropy --ema 0" exec bash "$(dirname "$0")/same_budget_128.sh"
