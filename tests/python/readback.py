#!/usr/bin/env python3
"""Reads a flatmerge output directory back with Python's `safetensors` and
numpy, the way a Hugging Face user would, and prints a JSON digest of every
tensor for the Rust test `tests/python_readback.rs` to compare.

Usage: python3 tests/python/readback.py OUT_DIR

Checks (exit status 1 and one line on stderr when one fails):
- the directory holds either `model.safetensors` alone, or shards named by
  `model.safetensors.index.json`, whose `weight_map` lists exactly the
  tensors of the shards, each in the shard holding it, names no other
  file, and whose `metadata.total_size` is the bytes of tensor data;
- every file opens with `safetensors.safe_open(..., framework="numpy")`,
  which lists the tensors, dtypes, shapes and `__metadata__` of the header;
- every tensor of a dtype numpy has is loaded by `get_tensor`, and files
  without BF16 by `safetensors.numpy.load_file`; both must equal, bit for
  bit, the tensor decoded here from the raw bytes. numpy has no bfloat16,
  so BF16 tensors are decoded here only: the 16 bits are the upper half of
  an IEEE float32.

The digest on stdout: {"files": [...], "index": bool, "metadata": {file:
{...}}, "tensors": {name: {"file", "dtype", "shape", "sum" (float64),
"abs_sum", "samples": [[flat index, value, raw bits as an integer], ...]}}}.
"""

import json
import os
import struct
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# dtype name -> (numpy dtype of the values, numpy dtype of the raw bits)
DTYPES = {
    "F64": (np.dtype("<f8"), np.dtype("<u8")),
    "F32": (np.dtype("<f4"), np.dtype("<u4")),
    "F16": (np.dtype("<f2"), np.dtype("<u2")),
    "BF16": (None, np.dtype("<u2")),
    "I64": (np.dtype("<i8"), np.dtype("<u8")),
    "I32": (np.dtype("<i4"), np.dtype("<u4")),
    "I16": (np.dtype("<i2"), np.dtype("<u2")),
    "I8": (np.dtype("i1"), np.dtype("u1")),
    "U8": (np.dtype("u1"), np.dtype("u1")),
}


class ReadbackError(Exception):
    pass


def read_raw(path):
    """The header (dict) and the data section (bytes) of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ReadbackError(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ReadbackError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(blob[8 : 8 + n])
    return header, blob[8 + n :]


def decode(raw, dtype, shape):
    """Values (numpy array of `shape`) and raw bits of one tensor's bytes."""
    if dtype not in DTYPES:
        raise ReadbackError(f"dtype {dtype} not handled by the readback script")
    value_dtype, bits_dtype = DTYPES[dtype]
    bits = np.frombuffer(raw, dtype=bits_dtype)
    if dtype == "BF16":
        values = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=value_dtype)
    return values.reshape(shape), bits.reshape(shape)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def sample_indices(n):
    return sorted({i for i in (0, 1, n // 3, n // 2, n - 2, n - 1) if 0 <= i < n})


def readback(out_dir):
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    index_path = os.path.join(out_dir, INDEX)
    weight_map = None
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ReadbackError(f"{index_path}: no weight_map")
        if SINGLE in files:
            raise ReadbackError(f"{out_dir}: both {SINGLE} and {INDEX}: which one is the model is ambiguous")
        named = sorted(set(weight_map.values()))
        if named != files:
            raise ReadbackError(f"{index_path}: names shards {named} but the directory holds {files}")
    elif files != [SINGLE]:
        raise ReadbackError(f"{out_dir}: expected {SINGLE} alone (no index), found {files}")

    digest = {"files": files, "index": weight_map is not None, "metadata": {}, "tensors": {}}
    total = 0
    for file_name in files:
        path = os.path.join(out_dir, file_name)
        header, data = read_raw(path)
        total += len(data)
        metadata = header.pop("__metadata__", None)
        digest["metadata"][file_name] = metadata
        has_bf16 = any(entry["dtype"] == "BF16" for entry in header.values())
        loaded = None if has_bf16 else load_file(path)
        if loaded is not None and sorted(loaded) != sorted(header):
            raise ReadbackError(f"{path}: load_file gives tensors {sorted(loaded)}, the header lists {sorted(header)}")
        with safe_open(path, framework="numpy") as st:
            if sorted(st.keys()) != sorted(header):
                raise ReadbackError(f"{path}: safetensors lists {sorted(st.keys())}, the header {sorted(header)}")
            if st.metadata() != metadata:
                raise ReadbackError(f"{path}: safetensors metadata {st.metadata()} vs header {metadata}")
            for name in st.keys():
                entry = header[name]
                sl = st.get_slice(name)
                dtype, shape = sl.get_dtype(), list(sl.get_shape())
                if dtype != entry["dtype"] or shape != entry["shape"]:
                    raise ReadbackError(f"{path}: `{name}`: safetensors says {dtype} {shape}, the header {entry}")
                begin, end = entry["data_offsets"]
                values, bits = decode(data[begin:end], dtype, shape)
                if dtype != "BF16":
                    for how, array in [("get_tensor", st.get_tensor(name)), ("load_file", (loaded or {}).get(name))]:
                        if array is None:
                            continue
                        if not same_bits(np.ascontiguousarray(array).view(bits.dtype), bits):
                            raise ReadbackError(f"{path}: `{name}`: {how} differs from the raw bytes")
                if name in digest["tensors"]:
                    raise ReadbackError(f"{path}: `{name}` is also in {digest['tensors'][name]['file']}")
                if weight_map is not None and weight_map.get(name) != file_name:
                    raise ReadbackError(
                        f"{index_path}: `{name}` is in {file_name} but the index says {weight_map.get(name)}"
                    )
                flat, flat_bits = values.reshape(-1), bits.reshape(-1)
                wide = flat.astype(np.float64)
                digest["tensors"][name] = {
                    "file": file_name,
                    "dtype": dtype,
                    "shape": shape,
                    "sum": float(np.sum(wide)),
                    "abs_sum": float(np.sum(np.abs(wide))),
                    "samples": [[i, float(wide[i]), int(flat_bits[i])] for i in sample_indices(flat.size)],
                }
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(digest["tensors"]))
        if missing:
            raise ReadbackError(f"{index_path}: lists tensors no shard holds: {missing[:5]}")
        total_size = index.get("metadata", {}).get("total_size")
        if total_size != total:
            raise ReadbackError(f"{index_path}: total_size {total_size}, but the shards hold {total} bytes of data")
    return digest


def main(argv):
    if len(argv) != 2:
        print("usage: readback.py OUT_DIR", file=sys.stderr)
        return 2
    try:
        digest = readback(argv[1])
    except (ReadbackError, OSError, ValueError, KeyError, TypeError) as e:
        print(f"readback: {e}", file=sys.stderr)
        return 1
    json.dump(digest, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
