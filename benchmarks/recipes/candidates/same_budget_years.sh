#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe with the exact-age regression head.
# Measured before --ema joined the recipe: --ema 0 keeps it as measured.
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--age_years 0.5 --ema 0" exec bash "$(dirname "$0")/../same_budget.sh"
