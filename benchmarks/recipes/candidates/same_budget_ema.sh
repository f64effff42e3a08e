#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe scored with an exponential moving
# average of the weights (decay warming up towards 0.999: about 0.99 by the end of 3 epochs).
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--ema 0.999" exec bash "$(dirname "$0")/../same_budget.sh"
