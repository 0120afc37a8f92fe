"""mergekit layouts loaded by `transformers`, as a user of the output would:
a frankenmerge (`slices:`), a LoRA reference (`model+adapter`), a union
vocabulary and a `modules:` merge of a LLaVA model, merged by the CLI,
loaded with transformers and run, against the same model assembled
directly in torch."""

import copy
import json
import os

from helpers import assert_close, require, run_cli, tiny_llama

torch = require("torch")
transformers = require("transformers")
safetensors_torch = require("safetensors.torch")

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.numpy()


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()


def test_a_frankenmerge_loads_in_transformers_and_runs_as_the_stacked_layers(tmp_path):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B")
    (tmp_path / "frank.yaml").write_text(
        "slices:\n"
        "  - sources:\n      - model: ./A\n        layer_range: [0, 2]\n"
        "  - sources:\n      - model: ./B\n        layer_range: [1, 2]\n"
        "merge_method: passthrough\ndtype: float32\n"
    )
    run_cli("merge", tmp_path / "frank.yaml", tmp_path / "out", "-q")
    merged = load(tmp_path / "out")
    assert merged.config.num_hidden_layers == 3
    # The same model by hand: A's embeddings and layers 0–1, B's layer 1,
    # final norm and head.
    want = copy.deepcopy(a)
    want.model.layers.append(copy.deepcopy(b.model.layers[1]))
    want.config.num_hidden_layers = 3
    for i, layer in enumerate(want.model.layers):
        layer.self_attn.layer_idx = i
    want.model.norm = copy.deepcopy(b.model.norm)
    want.lm_head = copy.deepcopy(b.lm_head)
    assert_close(logits(merged), logits(want), "frankenmerge logits", rtol=1e-6)


def test_a_lora_reference_loads_as_the_adapted_model(tmp_path):
    a = tiny_llama(seed=2)
    a.save_pretrained(tmp_path / "A")
    g = torch.Generator().manual_seed(3)
    r, alpha = 4, 8.0
    factors = {}
    want = copy.deepcopy(a)
    with torch.no_grad():
        for i, layer in enumerate(want.model.layers):
            for name in ("q_proj", "v_proj"):
                w = getattr(layer.self_attn, name).weight
                fa = torch.randn((r, w.shape[1]), generator=g) * 0.1
                fb = torch.randn((w.shape[0], r), generator=g) * 0.1
                module = f"base_model.model.model.layers.{i}.self_attn.{name}"
                factors[f"{module}.lora_A.weight"] = fa
                factors[f"{module}.lora_B.weight"] = fb
                w += (alpha / r) * (fb @ fa)
    os.makedirs(tmp_path / "lora")
    safetensors_torch.save_file(factors, str(tmp_path / "lora" / "adapter_model.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "bias": "none"})
    )
    (tmp_path / "lora.yaml").write_text("merge_method: passthrough\nmodels:\n  - model: ./A+./lora\ndtype: float32\n")
    run_cli("merge", tmp_path / "lora.yaml", tmp_path / "out", "-q")
    merged = load(tmp_path / "out")
    assert_close(logits(merged), logits(want), "LoRA logits", rtol=1e-5)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["inputs"][0]["lora"].endswith("lora")


def test_the_builtin_chat_templates_render_in_transformers(tmp_path):
    tokenizers = require("tokenizers")
    from helpers import write_model
    import numpy as np

    vocab = {"<s>": 0, "</s>": 1, "hi": 2, "there": 3, "[UNK]": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    write_model(tmp_path / "A", {"model.norm.weight": np.ones(4, dtype=np.float32)})
    tok.save_pretrained(tmp_path / "A")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "there"},
        {"role": "user", "content": "hi"},
    ]
    expected = {
        "chatml": "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n",
        "llama3": "<s>"
        + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
        + "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "mistral": "<s> [INST] be brief\n\nhi [/INST] there</s> [INST] hi [/INST]",
        "alpaca": "be brief\n\n### Instruction:\nhi\n\n### Response:\nthere\n\n### Instruction:\nhi\n\n### Response:\n",
        "exaone": "[|system|]be brief[|endofturn|]\n[|user|]hi\n[|assistant|]there[|endofturn|]\n[|user|]hi\n[|assistant|]",
    }
    for name, want in expected.items():
        (tmp_path / "t.yaml").write_text(f"merge_method: passthrough\nmodels:\n  - model: ./A\nchat_template: {name}\n")
        out = tmp_path / f"out-{name}"
        run_cli("merge", tmp_path / "t.yaml", out, "-q")
        merged = transformers.AutoTokenizer.from_pretrained(out)
        got = merged.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got == want, f"{name}: {got!r}"


def word_tokenizer(words):
    tokenizers = require("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def test_a_union_vocabulary_merge_loads_in_transformers_and_runs_as_the_mapped_average(tmp_path):
    special = ["[UNK]", "<s>", "</s>"]
    a_words = special + [f"w{i}" for i in range(61)]
    # B: most of A's words at other ids, and ten of its own.
    b_words = special + [f"w{i}" for i in reversed(range(51))] + [f"x{i}" for i in range(10)]
    a, b = tiny_llama(seed=4, vocab=len(a_words)), tiny_llama(seed=5, vocab=len(b_words))
    for model, words, name in ((a, a_words, "A"), (b, b_words, "B")):
        model.save_pretrained(tmp_path / name)
        word_tokenizer(words).save_pretrained(tmp_path / name)
    (tmp_path / "union.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: ./A\n  - model: ./B\n"
        "parameters:\n  weight: 1.0\ntokenizer_source: union\ndtype: float32\n"
    )
    run_cli("merge", tmp_path / "union.yaml", tmp_path / "out", "-q")
    merged = load(tmp_path / "out")
    union = a_words + [f"x{i}" for i in range(10)]
    assert merged.config.vocab_size == len(union)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "w1 x3 w55 w2 x0 w50"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [union.index(t) for t in text.split()]
    assert tokenizer.decode(ids) == text

    # The same merge by hand: every other weight averaged; a row the two
    # share is their mean, a row only one has is that model's (mergekit's
    # rule for a token one model has), in the union's order.
    want = tiny_llama(seed=0, vocab=len(union))
    sa, sb = a.state_dict(), b.state_dict()
    state = {}
    for name, wa in sa.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = []
            for token in union:
                have = [s[name][words.index(token)] for s, words in ((sa, a_words), (sb, b_words)) if token in words]
                rows.append(sum(have) / len(have))
            state[name] = torch.stack(rows)
        else:
            state[name] = (wa + sb[name]) / 2
    want.load_state_dict(state)
    probe = torch.tensor([ids])
    with torch.no_grad():
        got, expected = merged(input_ids=probe).logits.numpy(), want(input_ids=probe).logits.numpy()
    assert_close(got, expected, "union-vocabulary logits", rtol=1e-5)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["vocabulary"]["added_tokens"] == 10
    assert report["vocabulary"]["rows_from"]["single_model"] == len(union) - 3 - 51


def tiny_llava(seed):
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=16,
    )
    # The last vision layer's features feed the projector, so a vision
    # layer appended by the merge shows in the logits.
    config = transformers.LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=63, vision_feature_layer=-1
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def vision_transformer(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def test_a_modules_merge_of_llava_loads_in_transformers_and_runs_as_the_assembled_model(tmp_path):
    a, b = tiny_llava(0), tiny_llava(1)
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B")
    (tmp_path / "modules.yaml").write_text(
        "merge_method: passthrough\ndtype: float32\nmodules:\n"
        "  text_decoder:\n    slices:\n"
        "      - sources:\n          - model: ./A\n            layer_range: [0, 2]\n"
        "      - sources:\n          - model: ./B\n            layer_range: [1, 2]\n"
        "  vision_tower:\n    slices:\n"
        "      - sources:\n          - model: ./A\n            layer_range: [0, 2]\n"
        "      - sources:\n          - model: ./B\n            layer_range: [0, 1]\n"
        "  multi_modal_projector:\n    models:\n      - model: ./B\n"
    )
    run_cli("merge", tmp_path / "modules.yaml", tmp_path / "out", "-q")
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "out", torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert merged.config.text_config.num_hidden_layers == 3
    assert merged.config.vision_config.num_hidden_layers == 3
    # The same model by hand: A's language layers 0–1 and B's 1, B's final
    # norm and head; A's vision layers 0–1 and B's 0, A's patch embeddings,
    # B's post-layernorm; B's projector.
    want = copy.deepcopy(a)
    lm = want.model.language_model
    lm.layers.append(copy.deepcopy(b.model.language_model.layers[1]))
    for i, layer in enumerate(lm.layers):
        layer.self_attn.layer_idx = i
    lm.norm = copy.deepcopy(b.model.language_model.norm)
    want.lm_head = copy.deepcopy(b.lm_head)
    tower = vision_transformer(want)
    tower.encoder.layers.append(copy.deepcopy(vision_transformer(b).encoder.layers[0]))
    tower.post_layernorm = copy.deepcopy(vision_transformer(b).post_layernorm)
    want.model.multi_modal_projector = copy.deepcopy(b.model.multi_modal_projector)
    want.config.text_config.num_hidden_layers = 3
    want.config.vision_config.num_hidden_layers = 3
    ids = torch.tensor([[1] + [63] * 4 + [5, 9, 3]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))

    def run(model):
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=pixels).logits.numpy()

    assert_close(run(merged), run(want), "modules merge logits", rtol=1e-6)
    # And the appended vision layer matters: other weights there give other logits.
    other = copy.deepcopy(want)
    with torch.no_grad():
        vision_transformer(other).encoder.layers[2].mlp.fc2.weight.add_(0.1)
    assert abs(run(other) - run(want)).max() > 1e-4
