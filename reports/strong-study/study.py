"""Paper vs strong protocol on briefly trained MNIST models (README: "What the strong protocol shows").

Usage: python reports/strong-study/study.py [FOLDER]  (default runs/strong-study; resumes from FOLDER/results.json).
results.json here was measured on the 2-core CPU before issue 9 replaced the Smooth Encoder (its "se" row is the old one).
"""
import json
import sys
import time
import time as _t
from pathlib import Path

from raven.config import TrainConfig
from raven.data import load_splits
from raven.eval.evaluate import EvalConfig, evaluate_model
from raven.eval.protocols import StrongObjectiveSettings, strong_validation_objective
from raven.sweep.selection import ObjectiveSettings, validation_objective
from raven.train import load_checkpoint, train

_T0 = _t.time()

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/strong-study")
MODELS = {
    "vae": dict(method="vae"),
    "vae-noise": dict(method="vae-noise"),
    "raven-s0.01": dict(method="raven", sigma_aug=0.01),
    "se": dict(method="se"),
    "raven-s0.04": dict(method="raven", sigma_aug=0.04),
    "raven-s0.2": dict(method="raven", sigma_aug=0.2),
    "raven-gmm": dict(method="raven-gmm"),
    "raven-s1": dict(method="raven", sigma_aug=1.0),
}
log = lambda line: print(f"[{_t.time() - _T0:7.0f}s] {line}", flush=True)
splits = load_splits("mnist", None, "cpu")
out = json.loads((ROOT / "results.json").read_text()) if (ROOT / "results.json").is_file() else {}
for name, fields in MODELS.items():
    if name in out and "strong_objective" in out[name]:
        continue
    run = ROOT / name
    if (run / "checkpoint.pt").is_file():
        model = load_checkpoint(run / "checkpoint.pt")
    else:
        t = time.time()
        model = train(TrainConfig(epochs=3, limit=10000, **fields), device="cpu", out_dir=run, log=log).model
        log(f"{name}: trained in {time.time() - t:.0f}s")
    model.eval()
    t = time.time()
    config = EvalConfig(protocol="both", deltas=(0, 0.025, 0.05, 0.1, 0.2), limit=500, fid=False, tsne=False,
                        strong={"check_images": 200, "convergence": False})
    result = evaluate_model(model, splits, config, out_dir=run, label=name, log=log)
    entry = {"clean": result.clean_accuracy, "paper": result.adversarial_accuracy, "strong": result.robust_accuracy,
             "strong_by_attack": result.robust_accuracy_by_attack, "checks": result.checks,
             "survivors": result.autoattack_survivors, "eval_seconds": time.time() - t,
             "timings": result.timings}
    t = time.time()
    entry["paper_objective"] = validation_objective(model, splits, ObjectiveSettings())
    entry["paper_objective_seconds"] = time.time() - t
    t = time.time()
    entry["strong_objective"] = strong_validation_objective(model, splits, StrongObjectiveSettings())
    entry["strong_objective_seconds"] = time.time() - t
    out[name] = entry
    (ROOT / "results.json").write_text(json.dumps(out, indent=1))
    log(f"{name}: {json.dumps({k: entry[k] for k in ('clean', 'strong', 'eval_seconds')})}")
for name in ("raven-s0.04", "se"):
    if "convergence" in out[name]:
        continue
    model = load_checkpoint(ROOT / name / "checkpoint.pt").eval()
    t = time.time()
    config = EvalConfig(protocol="strong", deltas=(0, 0.025, 0.05, 0.1, 0.2), limit=500, fid=False, tsne=False,
                        strong={"check_images": 200})
    result = evaluate_model(model, splits, config, label=name, log=log)
    out[name]["convergence"] = {"strong": result.robust_accuracy, "checks": result.checks, "seconds": time.time() - t}
    (ROOT / "results.json").write_text(json.dumps(out, indent=1))
log("done")
