#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with 150 synthetic people of 60+
# (synthesize.py: pairs of real same-gender 60+ people blended image by image) added to training.
# Variables: those of same_budget_128.sh.
set -euo pipefail
: "${DATA:=../shared/data/utkmask}" "${OUT:=model/same_budget}" "${SEED:=0}"
python synthesize.py --data_dir "$DATA/train" --out_dir "$OUT/synthetic_old" --age_group 2 --n_people 150 \
    --seed "$SEED"
TRAIN_FLAGS="--extra_data $OUT/synthetic_old" exec bash "$(dirname "$0")/same_budget_128.sh"
