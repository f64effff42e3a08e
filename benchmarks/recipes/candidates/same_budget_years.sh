#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe with the exact-age regression head.
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--age_years 0.5" exec bash "$(dirname "$0")/../same_budget.sh"
