#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe at 160x160 (utkmask's native size).
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--resize 160 160" exec bash "$(dirname "$0")/../same_budget.sh"
