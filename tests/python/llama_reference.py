#!/usr/bin/env python3
"""An independent NumPy implementation of the LLaMA forward pass (Hugging
Face's `LlamaForCausalLM`, and mPLUG-Owl2's modality-adaptive variant),
for the Rust test `core/tests/llama_probe.rs` to compare flatmerge's
native probe with.

Usage: python3 tests/python/llama_reference.py MODEL_DIR PROBE_SET.jsonl [--gram [SOURCES]]

Reads `config.json` and the safetensors file(s) itself (the header parsed
here, F32/F16/BF16 decoded with numpy; no torch, no safetensors package),
runs every example of the probe set (`{"tokens": [...], "modality": ...,
"meta": {"token_modality": [...]}}`) and prints JSON on stdout:

    {"examples": [{"logits": [[...] per token],
                   "layers": {layer: {"x": [[...] per token], "y": [[...]]}}}]}

for every linear layer (q/k/v/o/gate/up/down and each multiway copy, whose
rows are only the tokens routed to it), `x` its input and `y` its output
before any nonlinearity.

With `--gram` it prints, instead, each linear layer's mean input second
moment over every token of the examples (those whose `source` is one of
the comma-separated SOURCES, when given), as SPEC §4 version 2 defines
`L.x_gram`:

    {"grams": {layer: [[...] per row]}, "counts": {layer: tokens}}

Arithmetic is float64 throughout, except the rotary tables, which follow
`transformers`: inverse frequencies, position × frequency and cos/sin in
float32. Rotary embeddings use `rotate_half` (the head vector split in
halves).
"""

import json
import math
import os
import struct
import sys

import numpy as np

MODALITIES = {"text": 0, "vision": 1, "audio": 2}


def read_safetensors(path):
    tensors = {}
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[base + begin : base + end]
        dtype = info["dtype"]
        if dtype == "F32":
            values = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        elif dtype == "F16":
            values = np.frombuffer(raw, dtype="<f2").astype(np.float64)
        elif dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            values = bits.view(np.float32).astype(np.float64)
        else:
            continue
        tensors[name] = values.reshape(info["shape"])
    return tensors


def read_model(model_dir):
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return read_safetensors(single)
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(read_safetensors(os.path.join(model_dir, shard)))
    return tensors


def inv_freq(config, head_dim, seq_len):
    """transformers' rope initialisation (default, linear, dynamic, llama3), float32."""
    base = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    max_pos = config.get("max_position_embeddings", 2048)
    if kind == "dynamic" and seq_len > max_pos:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freq = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
    if kind == "linear":
        freq = (freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = scaling["factor"]
        low = scaling["low_freq_factor"]
        high = scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen = old / low
        high_wavelen = old / high
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind not in ("default", "dynamic"):
        raise SystemExit(f"rope scaling {kind} not implemented here")
    return freq


def rope(x, cos, sin):
    """x [T, heads, d]; cos, sin [T, d/2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def token_modalities(example, n):
    meta = example.get("meta")
    if isinstance(meta, dict) and "token_modality" in meta:
        return [MODALITIES[m] if isinstance(m, str) else int(m) for m in meta["token_modality"]]
    m = example.get("modality", "text")
    return [MODALITIES[m] if isinstance(m, str) else int(m)] * n


class Model:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = json.load(f)
        self.w = read_model(model_dir)
        c = self.config
        self.hidden = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = c.get("head_dim") or self.hidden // self.heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.layers = c["num_hidden_layers"]

    def copies(self, base):
        """Layer names of a module: [base] or its multiway copies."""
        if base + ".weight" in self.w:
            return [base]
        out = []
        while f"{base}.multiway.{len(out)}.weight" in self.w:
            out.append(f"{base}.multiway.{len(out)}")
        return out

    def norm(self, base, x, routes):
        names = self.copies(base)
        out = np.empty_like(x)
        for t in range(x.shape[0]):
            name = names[0] if len(names) == 1 else names[routes[t]]
            out[t] = rms_norm(x[t], self.w[name + ".weight"], self.eps)
        return out

    def linear(self, base, x, routes, hooks):
        names = self.copies(base)
        if len(names) == 1:
            y = x @ self.w[names[0] + ".weight"].T
            hooks[names[0]] = {"x": x.tolist(), "y": y.tolist()}
            return y
        out_f = self.w[names[0] + ".weight"].shape[0]
        y = np.zeros((x.shape[0], out_f))
        for copy, name in enumerate(names):
            picked = [t for t in range(x.shape[0]) if routes[t] == copy]
            if not picked:
                continue
            ys = x[picked] @ self.w[name + ".weight"].T
            hooks[name] = {"x": x[picked].tolist(), "y": ys.tolist()}
            y[picked] = ys
        return y

    def forward(self, tokens, routes):
        T, d = len(tokens), self.head_dim
        hooks = {}
        h = self.w["model.embed_tokens.weight"][tokens]
        freq = inv_freq(self.config, d, T)
        angles = np.arange(T, dtype=np.float32)[:, None] * freq[None, :]
        cos = np.cos(angles.astype(np.float32)).astype(np.float64)
        sin = np.sin(angles.astype(np.float32)).astype(np.float64)
        group = self.heads // self.kv_heads
        mask = np.triu(np.ones((T, T), dtype=bool), k=1)
        for l in range(self.layers):
            p = f"model.layers.{l}"
            n = self.norm(f"{p}.input_layernorm", h, routes)
            q = self.linear(f"{p}.self_attn.q_proj", n, routes, hooks)
            k = self.linear(f"{p}.self_attn.k_proj", n, routes, hooks)
            v = self.linear(f"{p}.self_attn.v_proj", n, routes, hooks)
            q = rope(q.reshape(T, self.heads, d), cos, sin)
            k = rope(k.reshape(T, self.kv_heads, d), cos, sin)
            v = v.reshape(T, self.kv_heads, d)
            attn = np.zeros((T, self.heads, d))
            for head in range(self.heads):
                j = head // group
                scores = q[:, head, :] @ k[:, j, :].T / math.sqrt(d)
                scores = np.where(mask, -np.inf, scores)
                scores = np.exp(scores - scores.max(axis=1, keepdims=True))
                probs = scores / scores.sum(axis=1, keepdims=True)
                attn[:, head, :] = probs @ v[:, j, :]
            o = self.linear(f"{p}.self_attn.o_proj", attn.reshape(T, self.heads * d), routes, hooks)
            h = h + o
            n = self.norm(f"{p}.post_attention_layernorm", h, routes)
            gate = self.linear(f"{p}.mlp.gate_proj", n, routes, hooks)
            up = self.linear(f"{p}.mlp.up_proj", n, routes, hooks)
            act = gate / (1.0 + np.exp(-gate)) * up
            down = self.linear(f"{p}.mlp.down_proj", act, routes, hooks)
            h = h + down
        n = rms_norm(h, self.w["model.norm.weight"], self.eps)
        if self.config.get("tie_word_embeddings", False):
            head = self.w["model.embed_tokens.weight"]
        else:
            head = self.w["lm_head.weight"]
        return (n @ head.T).tolist(), hooks


def main():
    args = sys.argv[1:]
    gram = len(args) >= 3 and args[2] == "--gram"
    if len(args) != 2 and not (gram and len(args) <= 4):
        raise SystemExit(__doc__)
    sources = set(args[3].split(",")) if gram and len(args) == 4 else None
    model = Model(args[0])
    out = []
    sums, counts = {}, {}
    with open(args[1]) as f:
        for line in f:
            if not line.strip():
                continue
            example = json.loads(line)
            if sources is not None and example.get("source") not in sources:
                continue
            tokens = example["tokens"]
            routes = token_modalities(example, len(tokens))
            logits, hooks = model.forward(tokens, routes)
            if not gram:
                out.append({"logits": logits, "layers": hooks})
                continue
            for layer, h in hooks.items():
                x = np.asarray(h["x"], dtype=np.float64)
                sums[layer] = sums.get(layer, 0.0) + x.T @ x
                counts[layer] = counts.get(layer, 0) + x.shape[0]
    if gram:
        grams = {k: (v / counts[k]).tolist() for k, v in sums.items() if counts[k] > 0}
        json.dump({"grams": grams, "counts": counts}, sys.stdout)
    else:
        json.dump({"examples": out}, sys.stdout)


if __name__ == "__main__":
    main()
