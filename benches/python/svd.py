#!/usr/bin/env python3
"""NumPy peer of `cargo bench --bench svd`: the thin SVD of the same
matrix in float64 through LAPACK (`numpy.linalg.svd(full_matrices=False)`,
gesdd), as TSV-M and Iso-C decompose a task matrix (SPEC §8).

Usage: python3 benches/python/svd.py DIR ROWS COLS

Reads DIR/a.f32 ([ROWS, COLS], little-endian f32), writes the singular
values to DIR/numpy_s.f64 and prints {"seconds": …, "solver": …, "pinned":
…} (the load is not timed). `pinned` is false when NumPy's version differs
from benches/python/requirements.txt.
"""

import json
import pathlib
import sys
import time

import numpy as np


def pinned_numpy():
    req = pathlib.Path(__file__).with_name("requirements.txt").read_text()
    for line in req.splitlines():
        if line.startswith("numpy=="):
            return line.split("==", 1)[1].strip()
    return None


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    d, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    a = np.fromfile(f"{d}/a.f32", dtype="<f4").reshape(rows, cols).astype(np.float64)
    start = time.perf_counter()
    _, s, _ = np.linalg.svd(a, full_matrices=False)
    seconds = time.perf_counter() - start
    s.astype("<f8").tofile(f"{d}/numpy_s.f64")
    config = np.show_config(mode="dicts") or {}
    blas = config.get("Build Dependencies", {}).get("blas", {}).get("name", "?")
    json.dump(
        {
            "seconds": seconds,
            "solver": f"numpy {np.__version__} linalg.svd (LAPACK gesdd, {blas})",
            "pinned": np.__version__ == pinned_numpy(),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
