#!/usr/bin/env python3
"""NumPy peer of `cargo bench --bench least_squares`: the same RegMean
layer solve (SPEC §7, no bias) on the same matrices, in float64.

Usage: python3 benches/python/regmean_solve.py DIR OUT IN MODELS ALPHA

Reads DIR/w{k}.f32 ([OUT, IN]) and DIR/g{k}.f32 ([IN, IN]), little-endian
f32, for k < MODELS; forms S = Σ G̃_k, R = Σ W_k G̃_k with
G̃ = α G + (1 − α) diag(G); solves W* S = R; writes DIR/numpy.f32 and
prints {"seconds": …, "solver": …} (the load is not timed).

SciPy's Cholesky solve (`scipy.linalg.cho_factor`/`cho_solve`) is used when
SciPy is installed, which is what flatmerge does; otherwise NumPy's LU
`solve`, which does twice the factorisation work.
"""

import json
import sys
import time

import numpy as np


def main():
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    d, out, inp, models, alpha = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        float(sys.argv[5]),
    )
    ws = [np.fromfile(f"{d}/w{k}.f32", dtype="<f4").reshape(out, inp) for k in range(models)]
    gs = [np.fromfile(f"{d}/g{k}.f32", dtype="<f4").reshape(inp, inp) for k in range(models)]
    try:
        import scipy.linalg as sl

        solver = f"scipy {__import__('scipy').__version__} cho_factor/cho_solve"
    except ImportError:
        sl = None
        solver = f"numpy {np.__version__} linalg.solve (LU)"
    start = time.perf_counter()
    s = np.zeros((inp, inp))
    r = np.zeros((out, inp))
    for w, g in zip(ws, gs):
        g = g.astype(np.float64)
        gt = alpha * g
        gt[np.diag_indices(inp)] += (1.0 - alpha) * np.diag(g)
        s += gt
        r += w.astype(np.float64) @ gt
    # W* S = R  ⇔  S W*ᵀ = Rᵀ (S symmetric).
    if sl is not None:
        x = sl.cho_solve(sl.cho_factor(s), r.T).T
    else:
        x = np.linalg.solve(s, r.T).T
    seconds = time.perf_counter() - start
    x.astype("<f4").tofile(f"{d}/numpy.f32")
    json.dump({"seconds": seconds, "solver": solver}, sys.stdout)


if __name__ == "__main__":
    main()
