#!/usr/bin/env python3
"""Checks the crate dependency arrows: schemas <- runtime <- profiler <- calibrate.

Each crate may depend (normal, dev or build) only on the crates to its left. Run from the repository
root; exits 1 and names the offending edge if an arrow points the wrong way.
"""
import json
import subprocess
import sys

ORDER = ["schemas", "runtime", "profiler", "calibrate"]
meta = json.loads(
    subprocess.check_output(["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"])
)
bad = []
for pkg in meta["packages"]:
    name = pkg["name"]
    if name not in ORDER:
        bad.append(f"unexpected workspace crate {name!r}: add it to scripts/check-deps.py")
        continue
    allowed = set(ORDER[: ORDER.index(name)])
    for dep in pkg["dependencies"]:
        if dep["name"] in ORDER and dep["name"] not in allowed:
            bad.append(f"{name} depends on {dep['name']} ({dep.get('kind') or 'normal'}): arrows point schemas <- runtime <- profiler <- calibrate")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print("dependency arrows ok: " + " <- ".join(ORDER))
