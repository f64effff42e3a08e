#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) at 160x160 (utkmask's native
# size) with the stem and the first stages of the backbone frozen (`--freeze 5`), in fp32.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--resize 160 160 --freeze 5 --amp off" exec bash "$(dirname "$0")/same_budget_128.sh"
