#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) trained for 4 epochs.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--epochs 4" exec bash "$(dirname "$0")/same_budget_128.sh"
