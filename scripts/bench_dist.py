#!/usr/bin/python3
"""Distributed attention benchmarks of issue 3, printed as markdown tables.

Runs `ringattn attention` under mpirun with --json and summarises:
  overlap     ring forward time vs the compute inside it, with and without polling
  efficiency  causal zigzag forward+backward on P ranks vs one rank doing all the work
  balance     per-rank compute spread for contiguous / zigzag / striped (causal)
  memory      per-rank peak memory at L=65536, 4 ranks vs 1 rank
  strategies  ring vs ulysses vs allgather at P=2 and 4: time, bytes, peak memory
Usage: scripts/bench_dist.py [--bin build/release/ringattn] [--only overlap,balance,...] [--seq N]
Uses Debian's /usr/bin/python3 (standard library only).
"""
import argparse
import json
import os
import subprocess
import sys

MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,vader"]


def run(binary, ranks, args):
    cmd = (MPI + ["-np", str(ranks)] if ranks > 0 else []) + [binary, "attention", "--json", "--threads", "1"] + args
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def mib(x):
    return x / 1048576.0


def overlap(b, seq):
    print(f"\n### Overlap: ring forward, P=2, L={seq}, H=8, d=128, non-causal, fp32, one thread per rank\n")
    # The same per-rank work without any communication: one process attending
    # L/2 queries to all L keys on one core.
    alone = run(b, 0, ["--seq", str(seq // 2), "--kv-seq", str(seq), "--heads", "8", "--dim", "128"])
    t0 = alone["forward"]["seconds"]
    print(f"Compute only (one process, Lq={seq // 2}, Lk={seq}, one core): {t0*1e3:.1f} ms\n")
    print("| polling | rank | time [ms] | in kernels [ms] | waiting [ms] | time / compute-only |")
    print("|---|---|---|---|---|---|")
    for flag, name in (([], "between tiles"), (["--no-overlap"], "off")):
        j = run(b, 2, ["--strategy", "ring", "--seq", str(seq), "--heads", "8", "--dim", "128"] + flag)
        for r in j["per_rank"]:
            f = r["forward"]
            print(f"| {name} | {r['rank']} | {f['seconds']*1e3:.1f} | {f['compute_seconds']*1e3:.1f} | "
                  f"{f['wait_seconds']*1e3:.1f} | {f['seconds']/t0:.3f} |")


def efficiency(b, seq):
    print(f"\n### Parallel efficiency: causal zigzag ring, forward+backward, L={seq}, H=8, d=128, fp32\n")
    base = ["--seq", str(seq), "--heads", "8", "--dim", "128", "--causal", "--backward"]
    one = run(b, 0, base)
    t1 = one["forward"]["seconds"] + one["backward"]["seconds"]
    print("| ranks | fwd+bwd [ms] (slowest rank) | efficiency T1/(P·TP) |")
    print("|---|---|---|")
    print(f"| 1 (local kernels, 1 core) | {t1*1e3:.1f} | 1.00 |")
    for P in (2,):
        j = run(b, P, ["--strategy", "ring", "--layout", "zigzag"] + base)
        tp = max(r["forward"]["seconds"] + r["backward"]["seconds"] for r in j["per_rank"])
        print(f"| {P} | {tp*1e3:.1f} | {t1/(P*tp):.3f} |")


def balance(b, seq):
    print(f"\n### Causal load balance: ring forward+backward, L={seq}, H=8, d=128, compute time per rank\n")
    print("| layout | P | per-rank compute [ms] | spread (max−min)/max |")
    print("|---|---|---|---|")
    for P in (2, 4):
        for layout in ("contiguous", "zigzag", "striped"):
            j = run(b, P, ["--strategy", "ring", "--layout", layout, "--seq", str(seq), "--heads", "8", "--dim",
                           "128", "--causal", "--backward"])
            c = [r["forward"]["compute_seconds"] + r["backward"]["compute_seconds"] for r in j["per_rank"]]
            label = f"{P}" + (" (oversubscribed)" if P > os.cpu_count() else "")
            print(f"| {layout} | {label} | {', '.join(f'{x*1e3:.0f}' for x in c)} | {(max(c)-min(c))/max(c):.3f} |")


def memory(b, seq):
    print(f"\n### Peak memory per rank: ring forward+backward, L={seq}, H=2, d=64, causal zigzag, fp32\n")
    print("(Every buffer scales with L·H·d, so the ratio does not depend on H and d; small H, d keep the")
    print("one-rank run short. Peak = bytes held in ringattn buffers, inputs and outputs included.)\n")
    print("| ranks | peak per rank [MiB] | ratio to 1 rank |")
    print("|---|---|---|")
    base = None
    for P in (1, 4):
        j = run(b, P, ["--strategy", "ring", "--layout", "zigzag", "--seq", str(seq), "--heads", "2", "--dim", "64",
                       "--causal", "--backward"])
        peak = max(r["peak_memory_bytes"] for r in j["per_rank"])
        base = base or peak
        print(f"| {P} | {mib(peak):.1f} | {peak/base:.3f} |")


def strategies(b, seq):
    print(f"\n### Ring vs Ulysses vs all-gather: forward+backward, L={seq}, H=8, d=128, causal zigzag, fp32\n")
    print("| P | strategy | fwd [ms] | bwd [ms] | sent MiB (fwd+bwd) | peak MiB |")
    print("|---|---|---|---|---|---|")
    for P in (2, 4):
        for s in ("ring", "ulysses", "allgather"):
            j = run(b, P, ["--strategy", s, "--layout", "zigzag", "--seq", str(seq), "--heads", "8", "--dim", "128",
                           "--causal", "--backward"])
            r = max(j["per_rank"], key=lambda r: r["forward"]["seconds"] + r["backward"]["seconds"])
            sent = r["forward"]["bytes_sent"] + r["backward"]["bytes_sent"]
            label = f"{P}" + (" (oversubscribed)" if P > os.cpu_count() else "")
            print(f"| {label} | {s} | {r['forward']['seconds']*1e3:.1f} | {r['backward']['seconds']*1e3:.1f} | "
                  f"{mib(sent):.1f} | {mib(r['peak_memory_bytes']):.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="build/release/ringattn")
    ap.add_argument("--only", default="overlap,efficiency,balance,memory,strategies")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--mem-seq", type=int, default=65536)
    a = ap.parse_args()
    for name in a.only.split(","):
        seq = a.mem_seq if name == "memory" else a.seq
        {"overlap": overlap, "efficiency": efficiency, "balance": balance, "memory": memory,
         "strategies": strategies}[name](a.bin, seq)


if __name__ == "__main__":
    main()
