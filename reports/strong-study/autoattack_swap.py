"""Issue 16: the strong protocol with the reference AutoAttack (pyautoattack) against torchattacks 3.5.1.

Usage: python reports/strong-study/autoattack_swap.py TORCHATTACKS_DIR [FOLDER]
  TORCHATTACKS_DIR: a folder holding torchattacks 3.5.1 (pip install --no-deps --target DIR torchattacks==3.5.1);
  FOLDER: where the study's models are trained and the results kept (default runs/strong-study; resumes).

The eight models of this study (3 epochs on 10,000 MNIST images; study.py) are trained again,
and on the first 500 test images, at each delta, the study's strong protocol is run once for
its PGD attacks and twice for AutoAttack: with raven/autoattack.py as it was at commit 7b139a4
(torchattacks' classes) and as it is now (the reference's classes), on the same images, the
same probe and the same seeds. Robust accuracy is the fraction left standing by every attack.
"""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from raven.eval.autoattack import ProbeOnMean, autoattack
from raven.config import TrainConfig
from raven.data import load_splits
from raven.eval.probe import encode_mean, train_linear_probe
from raven.eval.protocols import StrongConfig, worst_case
from raven.train import load_checkpoint, train

sys.path.insert(0, sys.argv[1])
OLD_SOURCE = subprocess.run(["git", "show", "7b139a4:raven/autoattack.py"], capture_output=True, text=True,
                            check=True).stdout.replace("from raven.attacks import", "from raven.eval.attacks import")
ROOT = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/strong-study")
ROOT.mkdir(parents=True, exist_ok=True)
old_path = ROOT / "autoattack_torchattacks.py"
old_path.write_text(OLD_SOURCE)
spec = importlib.util.spec_from_file_location("autoattack_torchattacks", old_path)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

MODELS = {  # cheapest first, so that a short session still covers most of them
    "raven-gmm": dict(method="raven-gmm"), "raven-s1": dict(method="raven", sigma_aug=1.0), "se": dict(method="se"),
    "raven-s0.2": dict(method="raven", sigma_aug=0.2), "raven-s0.04": dict(method="raven", sigma_aug=0.04),
    "raven-s0.01": dict(method="raven", sigma_aug=0.01), "vae-noise": dict(method="vae-noise"),
    "vae": dict(method="vae"),
}
DELTAS = (0.025, 0.05, 0.1, 0.2)
IMAGES = 500
T0 = time.time()
log = lambda line: print(f"[{time.time() - T0:7.0f}s] {line}", flush=True)

splits = load_splits("mnist", None, "cpu")
x, y = splits.test_x[:IMAGES], splits.test_y[:IMAGES]
results_path = ROOT / "autoattack_swap.json"
out = json.loads(results_path.read_text()) if results_path.is_file() else {}
for name, fields in MODELS.items():
    if name in out:
        continue
    run = ROOT / name
    if (run / "checkpoint.pt").is_file():
        model = load_checkpoint(run / "checkpoint.pt")
    else:
        model = train(TrainConfig(epochs=3, limit=10000, **fields), device="cpu", out_dir=run, log=log).model
    model.eval()
    probe, _ = train_linear_probe(encode_mean(model, splits.train_x[:10000]), splits.train_y[:10000])
    classifier = ProbeOnMean(model.encoder, probe)
    with torch.no_grad():
        clean = probe(encode_mean(model, x)).argmax(1) == y
    entry = {"clean": float(clean.double().mean()), "pgd": {}, "aa_torchattacks": {}, "aa_reference": {},
             "strong_torchattacks": {}, "strong_reference": {}, "survivors_torchattacks": {},
             "survivors_reference": {}, "seconds": {}}
    for delta in DELTAS:
        key = f"{delta:g}"
        pgd, _, _ = worst_case(model, probe, x, y, delta, StrongConfig(autoattack=False), seed=0, batch_size=500,
                               correct=clean)
        entry["pgd"][key] = float(pgd.double().mean())
        for label, module in (("torchattacks", old), ("reference", sys.modules["raven.eval.autoattack"])):
            started = time.time()
            alive, survivors = module.autoattack(classifier, x, y, delta, correct=clean, seed=12345, batch_size=500)
            entry["seconds"][f"{label}/{key}"] = time.time() - started
            entry[f"aa_{label}"][key] = float(alive.double().mean())
            entry[f"strong_{label}"][key] = float((alive & pgd).double().mean())
            entry[f"survivors_{label}"][key] = survivors
        log(f"{name} delta={key}: AutoAttack torchattacks {entry['aa_torchattacks'][key]:.3f} "
            f"reference {entry['aa_reference'][key]:.3f}; strong {entry['strong_torchattacks'][key]:.3f} "
            f"vs {entry['strong_reference'][key]:.3f}")
    out[name] = entry
    results_path.write_text(json.dumps(out, indent=1))
