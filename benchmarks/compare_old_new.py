"""Old build vs new build in one process, interleaved: merge (with the copy) and softcap.

    cp -r <old --target dir>/mha_ext /tmp/oldpkg/mha_old
    PYTHONPATH=<new --target dir>:/tmp/oldpkg python benchmarks/compare_old_new.py merge 9
    PYTHONPATH=<new --target dir>:/tmp/oldpkg python benchmarks/compare_old_new.py softcap 15

The old package loads as mha_old (its _core under its own name). Prints ratios only; writes
nothing. (issue 12, NOTES "Serving: merge and softcap")
"""
import sys, time, statistics, numpy as np
import mha_ext, mha_old
from concurrent.futures import ThreadPoolExecutor
assert mha_old._core.__file__ != mha_ext._core.__file__
what = sys.argv[1]; reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
def interleaved(fns, reps):
    for f in fns.values(): f()
    s = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter(); f(); s[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in s.items()}
rng = np.random.default_rng(0)
if what == "merge":
    shape = (8, 32, 512, 128)
    big = rng.standard_normal(shape, dtype=np.float32); dst = np.zeros_like(big)
    pool = ThreadPoolExecutor(2)
    h, dh = big.reshape(2, -1), dst.reshape(2, -1)
    for parts in (2, 4, 8):
        outs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(parts)]
        lses = [rng.standard_normal(shape[:3], dtype=np.float32) for _ in range(parts)]
        a = mha_old.merge(outs, lses, num_threads=2); b = mha_ext.merge(outs, lses, num_threads=2)
        err = max(float(np.max(np.abs(a[0] - b[0]))), float(np.max(np.abs(a[1] - b[1]))))
        buf = np.empty(shape, np.float32)
        t = interleaved({"copy": lambda: list(pool.map(lambda i: np.copyto(dh[i], h[i]), range(2))),
                         "old": lambda: mha_old.merge(outs, lses, num_threads=2),
                         "new": lambda: mha_ext.merge(outs, lses, num_threads=2),
                         "new_out": lambda: mha_ext.merge(outs, lses, num_threads=2, out=buf)}, reps)
        moved = sum(o.nbytes for o in outs) + sum(x.nbytes for x in lses) + outs[0].nbytes + lses[0].nbytes
        cg = 2 * big.nbytes / t["copy"] * 1e-9
        og, ng = moved / t["old"] * 1e-9, moved / t["new"] * 1e-9
        print(f"parts {parts}: copy {cg:.1f} GB/s | old {t['old']*1e3:.1f} ms {og:.1f} GB/s {og/cg:.0%} | new {t['new']*1e3:.1f} ms {ng:.1f} GB/s {ng/cg:.0%} | new out= {t['new_out']*1e3:.1f} ms {moved/t['new_out']*1e-9/cg:.0%} | new/old speed {t['old']/t['new']:.2f}x | maxdiff {err:.1e}", flush=True)
        del outs, lses
else:
    L, H, D = 2048, 8, 64
    q, k, v = (rng.standard_normal((1, H, L, D), dtype=np.float32) for _ in range(3))
    for causal in (False, True):
        fns = {}
        for name, m in (("old", mha_old), ("new", mha_ext)):
            fns[name + "_plain"] = lambda m=m: m.attention(q, k, v, causal=causal, num_threads=2)
            fns[name + "_cap"] = lambda m=m: m.attention(q, k, v, causal=causal, softcap=30.0, num_threads=2)
            if len(sys.argv) > 3: fns[name + "_alibi_cap"] = lambda m=m: m.attention(q, k, v, causal=causal, softcap=30.0, alibi_slopes=np.geomspace(0.5, 0.004, H).astype(np.float32), num_threads=2)
        t = interleaved(fns, reps)
        print(f"causal {causal}: " + " ".join(f"{k} {v*1e3:.1f}ms" for k, v in t.items()))
        for n in ("old", "new"):
            print(f"   {n}: softcap {t[n+'_plain']/t[n+'_cap']:.0%} of plain")
        print(f"   softcap new vs old speed {t['old_cap']/t['new_cap']:.2f}x, plain new/old {t['old_plain']/t['new_plain']:.2f}x", flush=True)
