#!/usr/bin/env python3
"""Tiny random checkpoints in the layouts people download, built and saved
by Hugging Face `transformers` itself (the tensor names are its own, not
flatmerge's), and the activations its modules see, for the Rust tests
`core/tests/hf_layouts.rs` and `tests/hetero_maps.rs`.

Usage:
    python3 tests/python/hf_models.py build KIND DIR [--vocab N] [--seed S]
    python3 tests/python/hf_models.py hooks DIR PROBE_SET.jsonl
    python3 tests/python/hf_models.py forward DIR

`build` writes a model directory of KIND with `save_pretrained`:
    llava          LlavaForConditionalGeneration (LLaMA text_config), as
                   transformers saves it: `language_model.model.layers.*`
    llava-memory   the same model's in-memory names (`model.language_model.*`,
                   `lm_head`), written from its state dict: the naming of
                   checkpoints saved from newer code without the conversion
    qwen2          Qwen2ForCausalLM (q/k/v biases, rope_theta 1e6)
    llava-qwen2    LlavaForConditionalGeneration with a Qwen2 text_config
    llava-onevision LlavaOnevisionForConditionalGeneration (Qwen2 text_config,
                   SigLIP vision tower), as transformers saves it
    qwen2-vl       Qwen2VLForConditionalGeneration (multimodal rope), as
                   transformers saves it: `model.layers.*`, `visual.*`
    mplug-owl2     an imitation of mPLUG-Owl2 (transformers ships no class):
                   a LlamaForCausalLM's tensors with k/v and both norms split
                   into `multiway.{0,1}` copies, plus `model.vision_model.*`
                   and `model.visual_abstractor.*` tensors from the
                   documented list (heterogeneous-pairs.md), small widths
    llava-original an imitation of the original LLaVA-1.5 release layout: a
                   LlamaForCausalLM's tensors plus `model.mm_projector.{0,2}`
                   (no vision tower, as released), flat config with
                   `model_type` llava

`hooks` loads DIR with transformers in float64, runs every example's
`tokens` (one sequence at a time, no padding) and records, through forward
hooks on every `nn.Linear` of the language model, each layer's input and
output. It prints JSON on stdout, keyed by the checkpoint's tensor names
without `.weight`:

    {"layers": {layer: {"x_mean": [...], "y_mean": [...],
                        "x_rows": [[...] per example], "y_rows": [[...]],
                        "x_gram": [[...]], "count": tokens}}}

`x_mean`/`y_mean` average over every token, `x_rows`/`y_rows` over each
example's tokens, `x_gram` is the mean of x xᵀ over every token (SPEC §4).

`forward` loads DIR with transformers and runs one forward pass on a few
tokens; it prints the logits' shape and fails on non-finite values (the
check that a merged checkpoint still loads and runs). With
`--language-model`, for the layouts transformers has no class for (the
original LLaVA), it loads the language model's tensors (`model.*` but the
vision modules and projector, `lm_head`) into a `LlamaForCausalLM` built
from the flat config, refusing any missing or extra language-model tensor.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file


def tiny_text(kind, vocab):
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if kind == "qwen2":
        return transformers.Qwen2Config(rope_theta=1e6, **common)
    return transformers.LlamaConfig(rope_theta=10000.0, **common)


def randomise(model, seed):
    # transformers initialises with std 0.02 and unit norms: activations
    # that small would make a relative comparison meaningless. N(0, 1/in)
    # keeps them of order one through the layers.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 0.0 if name.endswith(".bias") else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() == 2 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def llama_state(vocab, seed):
    model = transformers.LlamaForCausalLM(tiny_text("llama", vocab))
    randomise(model, seed)
    return model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_imitation(out, config, state, extra):
    os.makedirs(out, exist_ok=True)
    text = config.to_dict()
    text.update(extra)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(text, f, indent=2)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def mplug_owl2(out, vocab, seed):
    config, state = llama_state(vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for l in range(config.num_hidden_layers):
        for module in ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm", "post_attention_layernorm"):
            base = f"model.layers.{l}.{module}"
            w = state.pop(base + ".weight")
            for copy in (0, 1):
                state[f"{base}.multiway.{copy}.weight"] = w + 0.05 * copy * torch.randn(w.shape, generator=g)
    v, h = 16, config.hidden_size
    shapes = {
        "model.vision_model.embeddings.cls_token": [1, 1, v],
        "model.vision_model.embeddings.patch_embed.weight": [v, 3, 14, 14],
        "model.vision_model.embeddings.position_embedding": [1, 5, v],
        "model.vision_model.pre_layernorm.weight": [v],
        "model.vision_model.pre_layernorm.bias": [v],
        "model.vision_model.encoder.layers.0.input_layernorm.weight": [v],
        "model.vision_model.encoder.layers.0.self_attn.query_key_value.weight": [3 * v, v],
        "model.vision_model.encoder.layers.0.self_attn.query_key_value.bias": [3 * v],
        "model.vision_model.encoder.layers.0.self_attn.dense.weight": [v, v],
        "model.vision_model.encoder.layers.0.mlp.fc1.weight": [2 * v, v],
        "model.vision_model.encoder.layers.0.mlp.fc2.weight": [v, 2 * v],
        "model.vision_model.post_layernorm.weight": [v],
        "model.visual_abstractor.query_embeds": [1, 4, v],
        "model.visual_abstractor.encoder.layers.0.crossattention.attention.query.weight": [v, v],
        "model.visual_abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight": [22, v],
        "model.visual_abstractor.visual_fc.weight": [h, v],
        "model.visual_abstractor.visual_fc.bias": [h],
        "model.visual_abstractor.vit_eos": [1, 1, h],
    }
    for name, shape in shapes.items():
        state[name] = 0.1 * torch.randn(shape, generator=g)
    write_imitation(
        out,
        config,
        state,
        {"model_type": "mplug_owl2", "architectures": ["MPLUGOwl2LlamaForCausalLM"]},
    )


def llava_original(out, vocab, seed):
    config, state = llama_state(vocab, seed)
    g = torch.Generator().manual_seed(seed + 2)
    h, v = config.hidden_size, 16
    for name, shape in {
        "model.mm_projector.0.weight": [h, v],
        "model.mm_projector.0.bias": [h],
        "model.mm_projector.2.weight": [h, h],
        "model.mm_projector.2.bias": [h],
    }.items():
        state[name] = 0.1 * torch.randn(shape, generator=g)
    write_imitation(
        out,
        config,
        state,
        {
            "model_type": "llava",
            "architectures": ["LlavaLlamaForCausalLM"],
            "mm_hidden_size": v,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        },
    )


def build(kind, out, vocab, seed):
    torch.manual_seed(seed)
    if kind == "mplug-owl2":
        return mplug_owl2(out, vocab, seed)
    if kind == "llava-original":
        return llava_original(out, vocab, seed)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(tiny_text("qwen2", vocab))
    elif kind in ("llava", "llava-memory", "llava-qwen2"):
        text = tiny_text("qwen2" if kind == "llava-qwen2" else "llama", vocab)
        vision = transformers.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=16,
        )
        config = transformers.LlavaConfig(
            text_config=text, vision_config=vision, image_token_index=vocab - 1
        )
        model = transformers.LlavaForConditionalGeneration(config)
    elif kind == "llava-onevision":
        text = tiny_text("qwen2", vocab).to_dict()
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        config = transformers.LlavaOnevisionConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=vocab - 1,
            video_token_index=vocab - 2,
        )
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
    elif kind == "qwen2-vl":
        text = tiny_text("qwen2", vocab).to_dict()
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2], "rope_theta": 1e6}
        text.pop("rope_parameters", None)
        config = transformers.Qwen2VLConfig(
            text_config=text,
            vision_config=dict(
                depth=1,
                embed_dim=16,
                hidden_size=32,
                num_heads=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=vocab - 1,
            video_token_id=vocab - 2,
            vision_start_token_id=vocab - 3,
            bos_token_id=None,
            eos_token_id=None,
        )
        model = transformers.Qwen2VLForConditionalGeneration(config)
    else:
        raise SystemExit(f"unknown kind {kind}")
    randomise(model, seed)
    model.save_pretrained(out)
    if kind == "llava-memory":
        # The in-memory names, as `state_dict()` gives them.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        os.remove(os.path.join(out, "model.safetensors"))
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def load(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    arch = config["architectures"][0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(model_dir, dtype=torch.float64).eval()


def file_names(model_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return set(f.keys())


def checkpoint_name(module_name, on_disk):
    """The checkpoint's name for an in-memory module: itself, or the legacy
    llava-hf name transformers converts on load."""
    if module_name + ".weight" in on_disk:
        return module_name
    for legacy in (
        module_name.replace("model.language_model.", "language_model.model.", 1),
        module_name.replace("model.language_model.", "model.", 1),
    ):
        if legacy + ".weight" in on_disk:
            return legacy
    raise SystemExit(f"no checkpoint tensor for module {module_name}")


def hooks(model_dir, probe_path):
    model = load(model_dir)
    on_disk = file_names(model_dir)
    current = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lm_head" in name:
            continue
        if "vision" in name or "visual" in name or "multi_modal_projector" in name:
            continue
        layer = checkpoint_name(name, on_disk)

        def hook(mod, inputs, output, layer=layer):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).numpy()
            y = output.detach().reshape(-1, output.shape[-1]).numpy()
            current[layer] = (x.copy(), y.copy())

        handles.append(module.register_forward_hook(hook))
    sums = {}
    with open(probe_path) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    for example in examples:
        current.clear()
        ids = torch.tensor([example["tokens"]], dtype=torch.long)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for layer, (x, y) in current.items():
            s = sums.setdefault(
                layer,
                {"x": 0.0, "y": 0.0, "gram": 0.0, "count": 0, "x_rows": [], "y_rows": []},
            )
            s["x"] = s["x"] + x.sum(axis=0)
            s["y"] = s["y"] + y.sum(axis=0)
            s["gram"] = s["gram"] + x.T @ x
            s["count"] += x.shape[0]
            s["x_rows"].append(x.mean(axis=0).tolist())
            s["y_rows"].append(y.mean(axis=0).tolist())
    layers = {}
    for layer, s in sums.items():
        n = s["count"]
        layers[layer] = {
            "x_mean": (s["x"] / n).tolist(),
            "y_mean": (s["y"] / n).tolist(),
            "x_rows": s["x_rows"],
            "y_rows": s["y_rows"],
            "x_gram": (s["gram"] / n).tolist(),
            "count": n,
        }
    json.dump({"layers": layers}, sys.stdout)


def language_model(model_dir):
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        flat = json.load(f)
    keys = set(transformers.LlamaConfig().to_dict()) & set(flat)
    config = transformers.LlamaConfig(**{k: flat[k] for k in keys if k not in ("model_type", "architectures")})
    model = transformers.LlamaForCausalLM(config)
    tensors = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_dir, name)))
    lm = {
        k: v
        for k, v in tensors.items()
        if k == "lm_head.weight"
        or (k.startswith("model.") and not k.startswith(("model.mm_projector.", "model.vision_tower.")))
    }
    missing, unexpected = model.load_state_dict(lm, strict=False)
    if missing or unexpected:
        raise SystemExit(f"language model tensors: missing {missing}, unexpected {unexpected}")
    return model.double().eval()


def forward(model_dir, lm_only=False):
    model = language_model(model_dir) if lm_only else load(model_dir)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[1, 2, 3, min(4, vocab - 2)]], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise SystemExit("non-finite logits")
    print(json.dumps({"logits_shape": list(logits.shape)}))


def main():
    args = sys.argv[1:]
    if len(args) >= 3 and args[0] == "build":
        vocab, seed = 64, 0
        rest = args[3:]
        while rest:
            if rest[0] == "--vocab":
                vocab = int(rest[1])
            elif rest[0] == "--seed":
                seed = int(rest[1])
            else:
                raise SystemExit(__doc__)
            rest = rest[2:]
        build(args[1], args[2], vocab, seed)
    elif len(args) == 3 and args[0] == "hooks":
        np.set_printoptions(precision=17)
        hooks(args[1], args[2])
    elif len(args) == 2 and args[0] == "forward":
        forward(args[1])
    elif len(args) == 3 and args[0] == "forward" and args[2] == "--language-model":
        forward(args[1], lm_only=True)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
