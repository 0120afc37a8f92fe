#!/usr/bin/env python3
"""The language-model case of the quality benchmark (docs/quality.md).

Small LLaMA models (transformers `LlamaForCausalLM`, byte-level tokens)
are trained with PyTorch: an ancestor on a mixture of three text domains
found on this machine (Rust sources of the cargo registry, Python's
standard library, the licence texts of /usr/share/common-licenses), then
one fine-tune per domain. flatmerge's own LLaMA probe records their
statistics (means and rows on the shared meta-probe, Grams on each model's
own domain) and the flatmerge CLI merges them with every method; PyTorch
scores each merge by its test loss per domain, as the share of each
fine-tune's gain over the ancestor that the merge keeps:

    kept_d = (L_ancestor,d − L_merged,d) / (L_ancestor,d − L_finetuned_d,d)

Files are split by a hash of their path into train / validation / test;
the probe examples come from the train split, settings that need a choice
(task arithmetic's λ) are chosen on validation and every number reported
is on test. Deterministic for a seed (torch on CPU, fixed threads).

A benchmark, never a CI test (it needs PyTorch). Peers pinned in
benches/python/requirements-lm.txt.

    cargo build --release -p flatmerge-cli
    python3 benches/python/lm_quality.py --flatmerge target/release/flatmerge [--seeds 1,2,3] [--work DIR]
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.utils.logging.disable_progress_bar()

SEQ = 64
VOCAB = 256
DOMAINS = ("rust", "python", "licences")


def domain_files(name):
    if name == "rust":
        roots = sorted(Path.home().glob(".cargo/registry/src/*"))
        files = [p for r in roots for p in sorted(r.glob("*/src/**/*.rs"))]
    elif name == "python":
        import sysconfig

        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    else:
        files = sorted(Path("/usr/share/common-licenses").glob("*"))
    return [f for f in files if f.is_file() and f.stat().st_size > 512]


def split_of(path):
    """0 train, 1 validation, 2 test, by a hash of the path (stable across runs)."""
    h = int(hashlib.sha256(str(path).encode()).hexdigest()[:8], 16) % 10
    return 0 if h < 7 else (1 if h < 8 else 2)


def windows(files, split, limit, seed):
    """Up to `limit` byte windows of SEQ + 1 tokens from the files of `split`."""
    out = []
    for f in files:
        if split_of(f) != split:
            continue
        data = f.read_bytes()
        for start in range(0, len(data) - SEQ - 1, SEQ * 4):
            out.append(list(data[start : start + SEQ + 1]))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in order[:limit]]


def corpus(seed, sizes):
    data = {}
    for d in DOMAINS:
        files = domain_files(d)
        # Licences are few: split their windows instead of their files.
        if d == "licences":
            allw = []
            for f in files:
                b = f.read_bytes()
                for s in range(0, len(b) - SEQ - 1, SEQ):
                    allw.append(list(b[s : s + SEQ + 1]))
            g = torch.Generator().manual_seed(seed)
            allw = [allw[i] for i in torch.randperm(len(allw), generator=g).tolist()]
            n_test = min(sizes["test"], len(allw) // 5)
            n_val = min(sizes["val"], len(allw) // 5)
            data[d] = {
                "test": allw[:n_test],
                "val": allw[n_test : n_test + n_val],
                "train": allw[n_test + n_val :][: sizes["train"]],
            }
        else:
            data[d] = {
                "train": windows(files, 0, sizes["train"], seed),
                "val": windows(files, 1, sizes["val"], seed),
                "test": windows(files, 2, sizes["test"], seed),
            }
    return data


def model_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ * 2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def train(model, batches, steps, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    data = torch.tensor(batches)
    for step in range(steps):
        idx = torch.randint(0, len(data), (16,))
        x = data[idx]
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())
        # labels shifted inside the model: predict x[t+1] from x[..t]
        loss = out.loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


@torch.no_grad()
def loss_on(model, wins):
    model.eval()
    data = torch.tensor(wins)
    total, n = 0.0, 0
    for i in range(0, len(data), 64):
        x = data[i : i + 64]
        logits = model(input_ids=x[:, :-1]).logits
        l = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += l.item()
        n += x[:, 1:].numel()
    return total / n


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr}")
    return r.stdout


def write_probe(path, data, per_domain):
    with open(path, "w") as f:
        for d in DOMAINS:
            for w in data[d]["train"][:per_domain]:
                f.write(json.dumps({"tokens": w[:SEQ], "source": d}) + "\n")


def yaml_models(entries):
    y = "models:\n"
    for e in entries:
        y += f"  - model: {e['model']}\n"
        for key in ("stats", "grams"):
            if e.get(key):
                y += f"    {key}: {e[key]}\n"
        if e.get("weight"):
            y += f"    parameters: {{weight: {e['weight']}}}\n"
    return y


SUBSPACE = ("tsv", "iso_c", "iso_cts", "wudi")


def merge_configs(work, names, tuned_lambdas):
    """(label, kind, yaml) of every merge; kind `grid` rows are λ candidates."""
    m = {n: str(work / n) for n in names}
    meta = {n: str(work / f"{n}.stats.safetensors") for n in names}
    own = {n: str(work / f"{n}.own.stats.safetensors") for n in names}
    shared = {n: str(work / f"{n}.shared.stats.safetensors") for n in names}
    fts = [n for n in names if n != "ancestor"]
    base = f"base_model: {m['ancestor']}\n"
    out = []
    plain = yaml_models([{"model": m[n], "weight": 1.0} for n in fts])
    out.append(("linear (plain average)", "baseline", "merge_method: linear\n" + plain))
    for lam in tuned_lambdas:
        out.append(
            (
                f"task_arithmetic λ = {lam}",
                "grid task_arithmetic",
                "merge_method: task_arithmetic\n" + base + plain + f"parameters:\n  lambda: {lam}\n",
            )
        )
    out.append(
        (
            "ties (density 0.2, λ = 1)",
            "baseline",
            "merge_method: ties\n" + base + plain + "parameters:\n  density: 0.2\n",
        )
    )
    for label, grams in (("own-task", own), ("shared meta-probe", shared)):
        out.append(
            (
                f"regmean, {label} Grams (α = 0.9)",
                "least_squares",
                "merge_method: regmean\n"
                + yaml_models([{"model": m[n], "stats": grams[n]} for n in fts]),
            )
        )
    out.append(
        (
            "regmean_plusplus, own-task Grams (α = 0.9)",
            "least_squares",
            f"merge_method: regmean_plusplus\nprobe_set: {work / 'probe.jsonl'}\n"
            + yaml_models([{"model": m[n], "stats": own[n]} for n in fts]),
        )
    )
    # The data-free subspace methods (SPEC §8): their scale α on task
    # arithmetic's grid, α = 1 (SPEC's) reported as well as the α chosen on
    # validation, as for task arithmetic's λ.
    for method in SUBSPACE:
        for alpha in tuned_lambdas:
            out.append(
                (
                    f"{method} α = {alpha}",
                    f"grid {method}",
                    f"merge_method: {method}\n" + base + plain + f"parameters:\n  alpha: {alpha}\n",
                )
            )
    safe = "merge_method: safe_m\n" + base + f"base_model_stats: {meta['ancestor']}\n"
    with_meta = yaml_models([{"model": m[n], "stats": meta[n]} for n in fts])
    with_grams = yaml_models([{"model": m[n], "stats": meta[n], "grams": own[n]} for n in fts])
    out.append(("safe_m (SPEC defaults)", "safe_m", safe + with_meta))
    out.append(("safe_m preset: keep_all", "safe_m", safe + with_meta + "parameters:\n  preset: keep_all\n"))
    out.append(("safe_m preset: gram", "safe_m", safe + with_grams + "parameters:\n  preset: gram\n"))
    # The preset's structure at other scales (λ 1: RegMean without the bias folded in).
    for lam in (0.5, 1.0):
        out.append(
            (
                f"safe_m preset: gram, λ {lam}",
                "safe_m",
                safe + with_grams + f"parameters:\n  preset: gram\n  lambda_proj: {lam}\n",
            )
        )
    return out


def one_seed(seed, args, flatmerge, work, log):
    torch.manual_seed(seed)
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    data = corpus(seed, sizes)
    for d in DOMAINS:
        log(f"  {d}: {len(data[d]['train'])} train, {len(data[d]['val'])} val, {len(data[d]['test'])} test windows")
    t = time.time()
    ancestor = LlamaForCausalLM(model_config())
    mixed = [w for d in DOMAINS for w in data[d]["train"]]
    train(ancestor, mixed, args.pretrain_steps, 3e-3, seed)
    models = {"ancestor": ancestor}
    for i, d in enumerate(DOMAINS):
        ft = LlamaForCausalLM(model_config())
        ft.load_state_dict(ancestor.state_dict())
        train(ft, data[d]["train"], args.finetune_steps, 1e-3, seed * 100 + i)
        models[d] = ft
    log(f"  trained ancestor and {len(DOMAINS)} fine-tunes ({time.time() - t:.1f}s)")
    names = ["ancestor", *DOMAINS]
    for n, model in models.items():
        model.save_pretrained(work / n, safe_serialization=True)
    probe = work / "probe.jsonl"
    write_probe(probe, data, args.probe)
    t = time.time()
    for n in names:
        d = work / n
        run([flatmerge, "probe", d, "--probe-set", probe, "-o", work / f"{n}.stats.safetensors", "--quiet"])
        if n != "ancestor":
            run([flatmerge, "probe", d, "--probe-set", probe, "--gram", "--sources", n,
                 "-o", work / f"{n}.own.stats.safetensors", "--quiet"])
            run([flatmerge, "probe", d, "--probe-set", probe, "--gram",
                 "-o", work / f"{n}.shared.stats.safetensors", "--quiet"])
    log(f"  probed {len(names)} models ({time.time() - t:.1f}s)")

    def losses(model, split):
        return [loss_on(model, data[d][split]) for d in DOMAINS]

    anc = {s: losses(ancestor, s) for s in ("val", "test")}
    ft = {s: [loss_on(models[d], data[d][s]) for d in DOMAINS] for s in ("val", "test")}

    def kept(ls, split):
        return [(a - l) / (a - f) for a, l, f in zip(anc[split], ls, ft[split])]

    rows = [("fine-tuned (each domain's own model)", "reference", kept(ft["test"], "test"), kept(ft["val"], "val"))]
    rows.append(("ancestor", "reference", kept(anc["test"], "test"), kept(anc["val"], "val")))
    grid = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]
    best = {}  # per tuned method: (validation mean, row)
    t = time.time()
    for label, kind, yaml in merge_configs(work, names, grid):
        cfg = work / "merge.yaml"
        cfg.write_text(yaml + "dtype: float32\n")
        out = work / "merged"
        if out.exists():
            shutil.rmtree(out)
        run([flatmerge, "merge", cfg, out, "--quiet"])
        merged = LlamaForCausalLM.from_pretrained(out)
        row = (label, kind, kept(losses(merged, "test"), "test"), kept(losses(merged, "val"), "val"))
        if kind.startswith("grid "):
            method = kind.split(" ", 1)[1]
            score = sum(row[3]) / len(row[3])
            if method not in best or score > best[method][0]:
                best[method] = (score, row)
            if label.endswith("= 1.0"):
                scale = "λ" if method == "task_arithmetic" else "α"
                rows.append((f"{method} {scale} = 1", "baseline", row[2], row[3]))
        else:
            rows.append(row)
    chosen = {m: b[1][0].split("= ")[1] for m, b in best.items()}
    for method, (_, row) in best.items():
        scale = "λ" if method == "task_arithmetic" else "α"
        tuned = (f"{method}, {scale} tuned on validation", "baseline", row[2], row[3])
        if method == "task_arithmetic":
            rows.insert(3, tuned)
        else:
            rows.append(tuned)
    log(f"  merged and scored ({time.time() - t:.1f}s)")
    return rows, {
        "ancestor_test_loss": anc["test"],
        "finetuned_test_loss": ft["test"],
        "lambda": chosen["task_arithmetic"],
        "chosen": chosen,
    }


def mean_sd(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flatmerge", required=True, help="the flatmerge CLI binary")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--work", help="keep the models, statistics and merges here")
    p.add_argument("--train", type=int, default=3000, help="train windows per domain")
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--probe", type=int, default=128, help="probe examples per domain")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--finetune-steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    start = time.time()
    for seed in seeds:
        log(f"seed {seed}")
        work = Path(args.work) / f"seed-{seed}" if args.work else Path(tempfile.mkdtemp(prefix="flatmerge-lm-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            per_seed.append(one_seed(seed, args, args.flatmerge, work, log))
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    labels = [r[0].split(" (λ = ")[0] for r in per_seed[0][0]]
    print(f"Seeds {seeds}; torch {torch.__version__}; share of each fine-tune's test-loss gain kept (mean ± sd over seeds).\n")
    print("| method | " + " | ".join(DOMAINS) + " | mean | validation mean |")
    print("|---|" + "---|" * (len(DOMAINS) + 2))
    for i, label in enumerate(labels):
        cols = []
        for k in range(len(DOMAINS)):
            m, s = mean_sd([rows[i][2][k] for rows, _ in per_seed])
            cols.append(f"{m:.3f} ± {s:.3f}")
        m, s = mean_sd([sum(rows[i][2]) / len(DOMAINS) for rows, _ in per_seed])
        v, _ = mean_sd([sum(rows[i][3]) / len(DOMAINS) for rows, _ in per_seed])
        print(f"| {label} | " + " | ".join(cols) + f" | **{m:.3f} ± {s:.3f}** | {v:.3f} |")
    print()
    for seed, (_, info) in zip(seeds, per_seed):
        a = ", ".join(f"{x:.3f}" for x in info["ancestor_test_loss"])
        f = ", ".join(f"{x:.3f}" for x in info["finetuned_test_loss"])
        print(f"- seed {seed}: test loss (nats/byte) ancestor {a}; fine-tuned {f}; task_arithmetic λ chosen on validation = {info['lambda']}; α chosen: " + ", ".join(f"{m} {alpha}" for m, alpha in info["chosen"].items() if m != "task_arithmetic"))
    print(f"\nWall time: {time.time() - start:.1f} s.")


if __name__ == "__main__":
    main()
