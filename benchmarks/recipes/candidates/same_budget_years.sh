#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with the exact-age regression head.
# Measured before --ema joined the recipe: --ema 0 keeps it as measured.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--age_years 0.5 --ema 0" exec bash "$(dirname "$0")/same_budget_128.sh"
