"""Fixtures of the package tests: optional imports, tiny checkpoints, the
CLI, statistics read back with `safetensors`, the probe-vs-hooks tolerance."""

import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def require(name):
    """Imports `name`; skips the module without it, or fails under
    FLATMERGE_REQUIRE_PYTHON=1."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("FLATMERGE_REQUIRE_PYTHON") == "1":
            raise RuntimeError(f"FLATMERGE_REQUIRE_PYTHON=1 but `{name}` cannot be imported: {e}") from e
        pytest.skip(f"SKIP: `{name}` is not installed ({e})", allow_module_level=True)


def cli():
    """The `flatmerge` binary: $FLATMERGE_BIN, else the workspace's build
    (built here when absent)."""
    explicit = os.environ.get("FLATMERGE_BIN")
    if explicit:
        return explicit
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "flatmerge"
        if path.is_file():
            return str(path)
    subprocess.run(["cargo", "build", "-q", "-p", "flatmerge-cli"], cwd=ROOT, check=True)
    return str(ROOT / "target" / "debug" / "flatmerge")


def run_cli(*args):
    result = subprocess.run([cli(), *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, f"flatmerge {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def load_stats(path):
    """(tensors as numpy arrays, metadata) of a statistics file."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def gram_of(tensors, meta, layer):
    """A layer's Gram, through the file's `gram_shared` aliases."""
    shared = json.loads(meta.get("gram_shared", "{}") or "{}")
    return tensors.get(f"{layer}.x_gram", tensors.get(f"{shared.get(layer, layer)}.x_gram"))


def assert_close(got, want, what, rtol=1e-5):
    """|got − want| ≤ rtol · (|want| + rms(want)), the tolerance of the Rust
    probe-vs-transformers tests (core/tests/hf_layouts.rs)."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = np.sqrt(np.mean(want**2)) if want.size else 0.0
    bound = rtol * (np.abs(want) + scale)
    worst = np.max(np.abs(got - want) / np.maximum(bound, 1e-30)) if want.size else 0.0
    assert worst <= 1.0, f"{what}: largest error is {worst:.2f}× the tolerance"


def randomise(model, seed):
    # N(0, 1/in) weights keep activations of order one through the layers
    # (transformers' 0.02 would make relative comparisons meaningless).
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((0.0 if name.endswith(".bias") else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() == 2 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def tiny_llama(seed=0, vocab=64):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config)
    randomise(model, seed)
    return model.eval()


def padded(sequences, pad=0):
    """Right-padded input ids and the attention mask of `sequences`."""
    import torch

    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def write_model(directory, tensors, dtype="float32"):
    """A checkpoint directory of numpy tensors with a minimal config.json."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(dict(tensors), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "test", "torch_dtype": dtype}, f)


def clean(path):
    shutil.rmtree(path, ignore_errors=True)
