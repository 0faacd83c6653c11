#!/usr/bin/python3
"""Loss curve of `ringattn train --model|--config ... --log FILE`: the training
batches' loss by step and the held-out loss at each evaluation (bits per byte on
the right axis).

Usage: scripts/plot_training.py train_log.json loss.png
Uses Debian's /usr/bin/python3 with python3-matplotlib (scripts/install_deps.sh).
"""
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        j = json.load(f)
    steps = j["steps"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="training batch loss")
    val = [s for s in steps if "val_loss" in s]
    ax.plot([s["step"] for s in val], [s["val_loss"] for s in val], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy [nats/token]")
    right = ax.secondary_yaxis(
        "right", functions=(lambda n: n / math.log(2) / j["bytes_per_token"], lambda b: b * math.log(2) * j["bytes_per_token"]))
    right.set_ylabel("bits per byte")
    ax.set_title(f"{j['arch']} {j['params']:,} parameters, {j['tokenizer']} tokenizer, B={j['batch']} L={j['seq']}, "
                 f"sp={j['sp']} ({j['strategy']}, {j['layout']})\n{j['data']}: held-out "
                 f"{val[-1]['val_bits_per_byte']:.3f} bits/byte after {steps[-1]['step']} steps", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
