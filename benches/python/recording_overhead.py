#!/usr/bin/env python3
"""Cost of recording activation statistics from PyTorch, in one run:

1. `Recording` overhead on a LLaMA-shaped model (random `LlamaForCausalLM`
   built from a config, no download): the time of the same padded batches'
   forward passes with the hooks of `flatmerge.torch.Recording` ÷ without
   (means and rows; then with Grams too);
2. the recorder's throughput: `flatmerge.Recorder.push` of large f32 and
   bf16 activation batches, in GB/s of activations (x and y bytes as the
   hook holds them), means only and with the input Gram.

Usage (with the package installed, release build: `pip install .`):

    python3 benches/python/recording_overhead.py [--hidden 512] [--layers 4]
        [--batch 4] [--tokens 128] [--repeats 3] [--threads N]

Prints one JSON object. Each figure is the best of `--repeats` runs
(the machine is shared: the minimum is the least disturbed).
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import transformers

import flatmerge
from flatmerge.torch import Recording


def llama(hidden, layers, vocab=4096):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),  # LLaMA-7B's 11008 / 4096
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def batches(batch, tokens, vocab, count=2, seed=0):
    # Right padding: every example a different length, the longest `tokens`.
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (batch, tokens), generator=g)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        for b in range(batch):
            mask[b, tokens - (b * tokens) // (2 * batch) :] = 0
        mask[0] = 1
        out.append((ids, mask))
    return out


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def forward_all(model, data):
    with torch.no_grad():
        for ids, mask in data:
            model(input_ids=ids, attention_mask=mask)


def overhead(args):
    model = llama(args.hidden, args.layers)
    data = batches(args.batch, args.tokens, model.config.vocab_size)
    forward_all(model, data)  # warm-up
    plain = best(lambda: forward_all(model, data), args.repeats)
    result = {"plain_s": plain}
    for label, options in (("means_rows", {"rows": True}), ("gram", {"rows": True, "gram": True})):

        def recorded():
            with Recording(model, **options):
                forward_all(model, data)

        t = best(recorded, args.repeats)
        result[f"{label}_s"] = t
        result[f"{label}_ratio"] = t / plain
    tokens = sum(int(m.sum()) for _, m in data)
    result["real_tokens"] = tokens
    result["padded_tokens"] = sum(m.numel() for _, m in data)
    return result


def throughput(args):
    rows, width = 4096, args.hidden * 4
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(rows, width, generator=g)
    y32 = torch.randn(rows, width, generator=g)
    out = {"rows": rows, "width": width}
    for dtype in ("f32", "bf16"):
        if dtype == "f32":
            x, y = x32.numpy(), y32.numpy()
        else:
            x = x32.bfloat16().view(torch.int16).numpy()
            y = y32.bfloat16().view(torch.int16).numpy()
        for gram in (False, True):
            gw = 1024 if gram else width
            xs = np.ascontiguousarray(x[:, :gw]) if gram else x

            def push():
                rec = flatmerge.Recorder(rows=1, gram=gram)
                rec.push("layer", xs, y, 0)

            t = best(push, args.repeats)
            key = f"{dtype}_{'gram' + str(gw) if gram else 'means'}"
            out[f"{key}_gb_s"] = (xs.nbytes + y.nbytes) / t / 1e9
    # Save cost of a recording of that size (means, one row).
    rec = flatmerge.Recorder(rows=1)
    rec.push("layer", x32.numpy(), y32.numpy(), 0)
    with tempfile.TemporaryDirectory() as d:
        out["save_s"] = best(lambda: rec.save(os.path.join(d, "s.stats.safetensors")), args.repeats)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        json.dumps(
            {
                "flatmerge": flatmerge.version,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "model": {"hidden": args.hidden, "layers": args.layers, "batch": args.batch, "tokens": args.tokens},
                "overhead": overhead(args),
                "recorder": throughput(args),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
