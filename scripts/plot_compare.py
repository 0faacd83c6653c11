#!/usr/bin/python3
"""Bar chart of `ringattn compare --json-out FILE`: forward and training tokens/s,
time per output token, peak memory and bytes moved per rank, one bar per method.

Usage: scripts/plot_compare.py compare.json compare.png
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
    rows = [m for m in j["methods"] if "skipped" not in m and "failed" not in m]
    if not rows:
        sys.exit("plot_compare: no method ran")
    names = [m["method"] for m in rows]
    panels = [
        ("forward (prefill) tokens/s", [m["forward_tokens_per_s"] for m in rows]),
        ("training tokens/s", [m["train_tokens_per_s"] for m in rows]),
        ("time per output token [ms] (lower is better)", [m["time_per_output_token_ms"] for m in rows]),
        ("peak memory per rank [MiB]", [m["peak_memory_bytes_per_rank"] / 2**20 for m in rows]),
        ("sent per rank per training step [MiB]", [m["train_step_bytes_per_rank"] / 2**20 for m in rows]),
        ("sent per rank per decode step [KiB]", [m["decode_bytes_per_step_per_rank"] / 2**10 for m in rows]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    for ax, (title, values) in zip(axes.flat, panels):
        bars = ax.bar(range(len(values)), values, color=["tab:red"] + ["tab:blue"] * (len(values) - 1))
        ax.set_title(title)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=7)
    mdl = j["model"]
    lm = f"{mdl['arch']} (vocabulary {mdl['vocab']}), " if "arch" in mdl else ""
    fig.suptitle(f"ringattn compare: {lm}{mdl['layers']} layers, d_model {mdl['d_model']}, batch {j['batch']} x seq "
                 f"{j['seq']}, {j['ranks']} ranks, {j['dtype']}")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(sys.argv[2])


if __name__ == "__main__":
    main()
