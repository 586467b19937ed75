#!/bin/bash
# Is patience 5 enough for RAVEN? MNIST RAVEN seed 0 with the converged run's settings (sigma_aug 0.01, eta 10),
# trained 60 epochs without early stopping (its first 34 epochs are the converged run's, to the digit), then its
# clean accuracy, MSE and FID on all 10,000 test images. Run from a clone at 8769167:
#   RAVEN_DATA_DIR=... OUT=/tmp/raven-60 bash reports/cpu-converged/checks/mnist-raven-s0-60-epochs/run.sh
set -e
OUT=${OUT:-runs/raven-s0-60-epochs}
export OMP_NUM_THREADS=1
python -m raven.cli train --method raven --dataset mnist --seed 0 --epochs 60 --sigma-aug 0.01 --eta 10 --out "$OUT"
python -m raven.cli evaluate "$OUT" --protocol paper --deltas 0 --no-tsne
# The strong protocol at three budgets on the first 1,000 test images (its convergence check off), in its own folder.
mkdir -p "$OUT-strong" && cp "$OUT/checkpoint.pt" "$OUT-strong/"
python -m raven.cli evaluate "$OUT-strong" --protocol strong --deltas 0.025,0.05,0.1 --strong-limit 1000 \
    --no-strong-check --no-fid --no-tsne
