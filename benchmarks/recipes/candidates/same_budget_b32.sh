#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with batches of 32 (twice the
# updates in the same epochs).
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--batch_size 32" exec bash "$(dirname "$0")/same_budget_128.sh"
