#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) at 160x160 (utkmask's native size).
# Measured before --ema joined the recipe: --ema 0 keeps it as measured.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--resize 160 160 --ema 0" exec bash "$(dirname "$0")/same_budget_128.sh"
