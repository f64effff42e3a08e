#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe with plain cross entropy on
# the mask and gender heads (the age head keeps its soft targets).
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--criterion cross_entropy" exec bash "$(dirname "$0")/../same_budget.sh"
