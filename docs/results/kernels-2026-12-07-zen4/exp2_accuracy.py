# Error of the bf16 forward against float64 attention on the same bf16-rounded
# q, k, v, for each binary given: max |o - ref| / max |ref| and relative RMS.
# /usr/bin/python3 exp2_accuracy.py BINARY...
import numpy as np, subprocess, sys
rng = np.random.default_rng(0)
def bf16(x):
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7fff + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)
for (B, L, H, d, causal) in [(1, 512, 4, 64, False), (1, 512, 4, 64, True), (1, 2048, 2, 128, True)]:
    q, k, v = (bf16(rng.standard_normal((B, L, H, d)).astype(np.float32) * 1.5) for _ in range(3))
    for n, a in (("q", q), ("k", k), ("v", v)): np.save(f"/tmp/{n}.npy", a)
    qd, kd, vd = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("blhd,bmhd->bhlm", qd, kd) / np.sqrt(d)
    if causal: s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhlm,bmhd->blhd", p, vd)
    out = []
    for b in sys.argv[1:]:
        subprocess.run([b, "attention", "--q", "/tmp/q.npy", "--k", "/tmp/k.npy", "--v", "/tmp/v.npy", "--dtype", "bf16",
                        "--out", "/tmp/o.npy", "--threads", "1"] + (["--causal"] if causal else []), check=True, capture_output=True)
        o = np.load("/tmp/o.npy").astype(np.float64)
        out.append(f"{b.split('/')[-1]}: max {np.abs(o-ref).max()/np.abs(ref).max():.2e} rms {np.linalg.norm(o-ref)/np.linalg.norm(ref):.2e}")
    print(B, L, H, d, "causal" if causal else "full", " | ".join(out))
