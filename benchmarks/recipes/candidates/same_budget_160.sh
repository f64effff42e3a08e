#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe at 160x160 (utkmask's native size).
# Measured before --ema joined the recipe: --ema 0 keeps it as measured.
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--resize 160 160 --ema 0" exec bash "$(dirname "$0")/../same_budget.sh"
