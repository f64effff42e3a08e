#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): same_budget_steps (cosine after every update, 0.2-epoch
# warmup) with twice the peak learning rate, 2e-3 (a smooth cosine spends less time at high rates).
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--sched_on_updates --warmup_epochs 0.2 --lr 2e-3" exec bash "$(dirname "$0")/same_budget_128.sh"
