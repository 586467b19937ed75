import json
import sys
from scipy.stats import kendalltau, spearmanr
r = json.load(open(sys.argv[1] if len(sys.argv) > 1 else 'runs/strong-study/results.json'))
names = list(r)
full = [sum(r[n]["strong"][k] for k in ("0.025", "0.05", "0.1")) / 3 for n in names]
cheap = [r[n]["strong_objective"]["val_strong_robust_accuracy"] for n in names]
paper = [r[n]["paper_objective"]["val_robust_accuracy"] for n in names]
print(f"{'model':<14}{'clean':>7}{'full strong':>12}{'cheap strong':>13}{'paper obj':>10}")
for n, f, c, p in zip(names, full, cheap, paper):
    print(f"{n:<14}{r[n]['clean']:>7.3f}{f:>12.3f}{c:>13.3f}{p:>10.3f}")
for label, score in (("cheap strong", cheap), ("paper objective", paper)):
    print(label, "spearman %.3f (p %.3f)" % spearmanr(score, full), "kendall %.3f (p %.3f)" % kendalltau(score, full))
print("seconds: cheap", [round(r[n]["strong_objective_seconds"]) for n in names], "paper", [round(r[n]["paper_objective_seconds"]) for n in names])
print()
print(f"{'model':<14}" + "".join(f"{'paper kl '+d:>13}{'paper w2 '+d:>13}{'strong '+d:>11}" for d in ("0.05", "0.1", "0.2")))
for n in names:
    e = r[n]
    print(f"{n:<14}" + "".join(f"{e['paper']['kl'][d]:>13.3f}{e['paper']['w2'][d]:>13.3f}{e['strong'][d]:>11.3f}" for d in ("0.05", "0.1", "0.2")))
print()
for n in names:
    e = r[n]
    print(n, "by attack at 0.05:", {k: round(v["0.05"], 3) for k, v in e["strong_by_attack"].items()}, "0.1:", {k: round(v["0.1"], 3) for k, v in e["strong_by_attack"].items()})
