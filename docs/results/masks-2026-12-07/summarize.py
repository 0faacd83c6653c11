# Summarizes the JSON of commands.sh: per case the slowest rank's fwd + bwd seconds
# (every round), each rank's compute seconds, and the most bytes any rank sent.
import glob, json, re, statistics
rows = {}
for f in sorted(glob.glob("p*_docs_*.json")) + sorted(glob.glob("p*_full_*.json")):
    d = json.load(open(f))
    key = re.sub(r"_\d+\.json$|\.json$", "", f)
    pr = d["per_rank"]
    tot = max(r["forward"]["seconds"] + r["backward"]["seconds"] for r in pr)
    comp = [round(r["forward"]["compute_seconds"] + r["backward"]["compute_seconds"], 3) for r in pr]
    sent = max(r["forward"]["bytes_sent"] + r["backward"]["bytes_sent"] for r in pr) / 2**20
    e = rows.setdefault(key, {"t": [], "comp": [], "sent": sent, "pairs": d["visible_pairs"]})
    e["t"].append(round(tot, 3)); e["comp"].append(comp)
for k, e in rows.items():
    print(f"{k:24s} fwd+bwd s {e['t']} (best {min(e['t'])}, median {statistics.median(e['t'])})  "
          f"compute per rank {e['comp'][e['t'].index(min(e['t']))]}  MiB sent {e['sent']:.1f}  pairs {e['pairs']:.3e}")
