#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe with plain cross entropy on
# the mask and gender heads (the age head keeps its soft targets).
# Measured before --ema joined the recipe: --ema 0 keeps it as measured.
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--criterion cross_entropy --ema 0" exec bash "$(dirname "$0")/../same_budget.sh"
