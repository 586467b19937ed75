"""Issue 19: what clipping the attacked image to [0, 1] does to the paper protocol's curves (deviation D16).

Usage: python reports/clip-effect/measure.py CHECKPOINT_DIR [IMAGES]

On one trained model, the paper's protocol (linear probe on encoder means; 50-step PGD of delta/25 on
the KL and W2 dissimilarities, random start) is run twice on the first IMAGES test images (default
1,000), with the same probe and the same random starts: once as raven runs it (the L-inf ball
intersected with [0, 1], every iterate projected onto both), once in the L-inf ball alone (pixels may
leave [0, 1], as an attack that ignores the image domain would). Both readings of each are written:
the paper's (right after the attack) and the robust one (right on the clean image and after it).
Results go to reports/clip-effect/results.json next to this script.
"""
import json
import sys
import time
from pathlib import Path

import torch

import raven.eval.attacks as attacks_module
from raven import pgd
from raven.data import load_splits
from raven.eval.attacks import attack
from raven.eval.probe import encode_mean, train_linear_probe
from raven.train import load_checkpoint

DELTAS = (0.025, 0.05, 0.1, 0.2, 0.3)
ATTACKS = ("kl", "w2")
folder = Path(sys.argv[1])
images = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
torch.manual_seed(0)
model = load_checkpoint(folder).eval()
splits = load_splits(model.config.dataset, None, "cpu")
x, y = splits.test_x[:images], splits.test_y[:images]
probe, _ = train_linear_probe(encode_mean(model, splits.train_x), splits.train_y)
probe.requires_grad_(False)
with torch.no_grad():
    clean_right = probe(encode_mean(model, x)).argmax(1) == y
clipped_pgd = pgd.pgd_linf


def unclipped_pgd(objective, x, epsilon, steps, step_size, **kwargs):
    """pgd_linf in the L-inf ball alone: the same loop on z = 0.5 + x/100, where the ball of radius delta/100
    stays inside [0, 1], so pgd_linf's clamps to [0, 1] never bind (sign steps are unchanged by the scaling;
    float32 rounding near 0.5 adds ~1e-5 in x, far below a step)."""
    scale, offset = 0.01, 0.5
    out = clipped_pgd(lambda z: objective((z - offset) / scale), x * scale + offset, epsilon * scale, steps,
                      step_size * scale, **kwargs)
    return (out - offset) / scale


results = {"model": str(folder), "method": model.config.method, "images": images,
           "clean_accuracy": float(clean_right.double().mean()), "deltas": list(DELTAS), "runs": {}}
for name, fn in (("clipped", clipped_pgd), ("unclipped", unclipped_pgd)):
    attacks_module.pgd_linf = fn
    for kind in ATTACKS:
        for delta in DELTAS:
            started = time.perf_counter()
            out = attack(model, x, delta, kind, probe=probe, y=y, generator=torch.Generator().manual_seed(1))
            leaves = float(((out.x_adv < 0) | (out.x_adv > 1)).any(1).double().mean())
            row = {"paper": float(out.correct.double().mean()),
                   "robust": float((out.correct & clean_right).double().mean()),
                   "images_leaving_0_1": leaves, "seconds": round(time.perf_counter() - started, 1)}
            results["runs"].setdefault(name, {}).setdefault(kind, {})[str(delta)] = row
            print(name, kind, delta, row, flush=True)
attacks_module.pgd_linf = clipped_pgd
(Path(__file__).parent / "results.json").write_text(json.dumps(results, indent=1))
