#!/usr/bin/python3
"""Line chart of `ringattn plan --sweep ... --json`: the predicted rate of the best
layout of each kind against the sequence length (shows where RA+SP overtakes
TP x PP). `ringattn plan --sweep L1,L2,... --png FILE` calls it.

Usage: scripts/plot_plan.py sweep.json chart.png
Uses Debian's /usr/bin/python3 with python3-matplotlib (scripts/install_deps.sh).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        j = json.load(f)
    families = {}
    for p in j["points"]:
        families.setdefault(p["family"], []).append((p["seq"], p["value"]))
    if not families:
        sys.exit("plot_plan: no layout fits at any sequence length")
    unit = {"train": "training tokens/s", "forward": "forward tokens/s", "decode": "decode steps/s"}[j["objective"]]
    fig, ax = plt.subplots(figsize=(10, 6))
    for name, pts in sorted(families.items()):
        pts.sort()
        style = dict(linewidth=1.5, linestyle="--" if "DP/TP/PP" in name else "-")
        if name == "RA+SP":
            style = dict(linewidth=3, color="tab:red")
        elif name == "TP x PP":
            style = dict(linewidth=3, color="tab:blue")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"predicted {unit}")
    ax.set_title(f"ringattn plan: best layout of each kind on {j['world']} x {j['hardware']} (missing: does not fit)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
