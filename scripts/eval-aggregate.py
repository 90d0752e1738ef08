#!/usr/bin/env python3
"""Sums `attnplan eval --json` files (e.g. the rounds of scripts/eval-rounds.sh) into one table:
accuracy per task (dense, sparse, 95% Clopper-Pearson by bisection on the binomial), cases where the
outcome differs, perplexity and the FLOPs fraction (case-weighted) per task and over all prompts, and
the cases each side answered alone (from the per-case lists of files that have them)."""
import json, math, sys

def binom_cdf(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p)**(n - i) for i in range(k + 1))

def bisect(f, target, increasing):
    """p in [0, 1] with f(p) = target, f monotone."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2

def clopper_pearson(k, n):
    if n == 0:
        return (0.0, 1.0)
    lower = 0.0 if k == 0 else bisect(lambda p: 1 - binom_cdf(k - 1, n, p), 0.025, True)
    upper = 1.0 if k == n else bisect(lambda p: binom_cdf(k, n, p), 0.025, False)
    return (lower, upper)

acc = {}
nll = {"dense": 0.0, "sparse": 0.0}
tokens = 0
flops, weight = 0.0, 0
alone = []
for path in sys.argv[1:]:
    r = json.load(open(path))
    sources = set()
    for side in ("dense", "sparse"):
        for task, (ok, n) in r[side]["accuracy"].items():
            a = acc.setdefault(task, {"dense": [0, 0], "sparse": [0, 0], "same": [0, 0],
                                      "nll": [0.0, 0.0], "tokens": 0, "flops": 0.0})
            a[side][0] += ok; a[side][1] += n
            sources.add(task)
        nll[side] += r[side]["nll"]
    tokens += r["dense"]["tokens"]
    for task, (same, n) in r["agreement"].items():
        a = acc[task]["same"]; a[0] += same; a[1] += n
    cases = sum(n for _, n in r["dense"]["accuracy"].values())
    flops += r["flops_fraction"] * cases; weight += cases
    # per task: files of one source (as eval-rounds.sh writes them) carry that task's figures
    if len(sources) == 1:
        a = acc[sources.pop()]
        a["nll"][0] += r["dense"]["nll"]; a["nll"][1] += r["sparse"]["nll"]
        a["tokens"] += r["dense"]["tokens"]; a["flops"] += r["flops_fraction"] * cases
    for c in r.get("cases", []):
        d, s = c["dense"]["correct"], c["sparse"]["correct"]
        if d is not None and d != s:
            alone.append(f"{path}: {c['sample']}: {'dense' if d else 'sparse'} only")
print("| task | dense | sparse | same outcome | dense 95% CI | sparse 95% CI | perplexity change | attention FLOPs |")
print("|---|---|---|---|---|---|---|---|")
for task, a in sorted(acc.items()):
    (dk, dn), (sk, sn), (ak, an) = a["dense"], a["sparse"], a["same"]
    dl, du = clopper_pearson(dk, dn); sl, su = clopper_pearson(sk, sn)
    ppl = flo = "-"
    if a["tokens"]:
        ppl = f"{100 * (math.exp((a['nll'][1] - a['nll'][0]) / a['tokens']) - 1):+.2f}%"
        flo = f"{a['flops'] / max(dn, 1):.3f}"
    print(f"| {task} | {dk}/{dn} | {sk}/{sn} | {ak}/{an} | {100*dl:.0f}-{100*du:.0f}% | {100*sl:.0f}-{100*su:.0f}% | {ppl} | {flo} |")
pd, ps = math.exp(nll["dense"] / tokens), math.exp(nll["sparse"] / tokens)
print(f"\nperplexity over {tokens} prompt tokens: dense {pd:.4f}, sparse {ps:.4f} ({100*(ps/pd-1):+.2f}%)")
print(f"attention FLOPs fraction (case-weighted): {flops/max(weight,1):.4f}")
for line in alone:
    print(line)
