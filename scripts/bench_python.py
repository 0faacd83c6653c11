"""The Python package's costs: call overhead, and ringattn.torch.attention against torch's
scaled_dot_product_attention on CPU, in one run.

    .venv/bin/python scripts/bench_python.py [--seq 4096] [--json-out FILE]
    (PYTHONPATH=build/release/python for the build tree's package)

Overhead: the median time of a call on tiny arrays (B=1, L=4, H=1, d=8) through
ringattn.attention (numpy), ringattn.torch.attention (no grad) and the raw
extension call. Against SDPA: L, H = 8, d = 128, causal, fp32 and bf16, forward
and forward + backward, on 1 and 2 threads (torch.set_num_threads and ringattn's
threads), best of --reps; GFLOP/s by visible pairs (forward 4·B·H·d per pair,
backward 2.5× that) and the ratio to this core's FMA peak measured in the same run.
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import ringattn
import ringattn.torch as rt
from ringattn import _ringattn


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def per_call_us(fn, n=2000):
    for _ in range(100):
        fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


def best(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--seq", type=int, default=4096)
    a.add_argument("--heads", type=int, default=8)
    a.add_argument("--dim", type=int, default=128)
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--threads", default="1,2")
    a.add_argument("--json-out")
    args = a.parse_args()

    x = np.ones((1, 4, 1, 8), np.float32)
    o, lse = np.empty_like(x), np.empty((1, 1, 4), np.float32)
    t = torch.ones(1, 4, 1, 8)
    overhead = {
        "ringattn.attention (numpy)": per_call_us(lambda: ringattn.attention(x, x, x)),
        "_ringattn.attention_forward (raw)": per_call_us(
            lambda: _ringattn.attention_forward(x, x, x, o, lse, False, None, -1, -1, None, None, 1)),
    }
    with torch.no_grad():
        overhead["ringattn.torch.attention (no grad)"] = per_call_us(lambda: rt.attention(t, t, t))
    # the kernel alone at this size, for what the Python layer adds on top
    peaks = {d: _ringattn.measure_fma_peak_gflops(d) for d in ("fp32", "bf16")}

    B, L, H, d = 1, args.seq, args.heads, args.dim
    pairs = L * (L + 1) / 2
    fwd_flops = 4 * B * H * d * pairs
    rows = []
    for threads in [int(n) for n in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for dtype, peak_key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            g = torch.Generator().manual_seed(0)
            q, k, v, do = (torch.randn(B, L, H, d, generator=g).to(dtype) for _ in range(4))
            qt, kt, vt = (z.transpose(1, 2) for z in (q, k, v))  # SDPA's [B, H, L, d] (views)
            leaves = [z.clone().requires_grad_() for z in (q, k, v)]

            def ours_fwd():
                with torch.no_grad():
                    rt.attention(q, k, v, causal=True, threads=threads)

            def sdpa_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

            def ours_both():
                o = rt.attention(*leaves, causal=True, threads=threads)
                torch.autograd.grad(o, leaves, do)

            def sdpa_both():
                lt = [z.transpose(1, 2) for z in leaves]
                o = F.scaled_dot_product_attention(*lt, is_causal=True)
                torch.autograd.grad(o, leaves, do.transpose(1, 2))

            for name, fn, flops in (("forward", (ours_fwd, sdpa_fwd), fwd_flops),
                                    ("forward+backward", (ours_both, sdpa_both), 3.5 * fwd_flops)):
                t_ours, t_sdpa = best(fn[0], args.reps), best(fn[1], args.reps)
                gf = flops / t_ours / 1e9
                rows.append(dict(threads=threads, dtype=peak_key, pass_=name, ringattn_ms=t_ours * 1e3,
                                 sdpa_ms=t_sdpa * 1e3, speedup=t_sdpa / t_ours, ringattn_gflops=gf,
                                 of_peak=gf / (peaks[peak_key] * threads)))

    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), kernel path {_ringattn.isa()}, torch {torch.__version__}")
    print(f"FMA peak of one core (this run): fp32 {peaks['fp32']:.1f}, bf16 {peaks['bf16']:.1f} GFLOP/s")
    print("\nPython call overhead (tiny arrays, median per call):")
    for k, us in overhead.items():
        print(f"  {k:38s} {us:7.2f} us")
    print(f"\nringattn.torch.attention vs torch SDPA: B={B}, L={L}, H={H}, d={d}, causal, best of {args.reps}")
    print(f"{'threads':>7} {'dtype':>5} {'pass':>17} {'ringattn ms':>12} {'sdpa ms':>10} {'speedup':>8} "
          f"{'GFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        print(f"{r['threads']:>7} {r['dtype']:>5} {r['pass_']:>17} {r['ringattn_ms']:>12.1f} {r['sdpa_ms']:>10.1f} "
              f"{r['speedup']:>7.2f}x {r['ringattn_gflops']:>8.1f} {r['of_peak']:>8.2f}")
    if args.json_out:
        with open(args.json_out + ".tmp", "w") as f:
            json.dump(dict(cpu=cpu_name(), isa=_ringattn.isa(), torch=torch.__version__, peaks_gflops=peaks,
                           overhead_us=overhead, rows=rows), f, indent=1)
        os.replace(args.json_out + ".tmp", args.json_out)


if __name__ == "__main__":
    main()
