#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe with batches of 32 (twice the
# updates in the same epochs).
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--batch_size 32" exec bash "$(dirname "$0")/../same_budget.sh"
