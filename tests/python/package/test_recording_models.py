"""Recording on a vision-language model (tiny random LlavaForConditionalGeneration:
vision tower, projector, language model) and on an mPLUG-Owl2-style
multiway module, recorded per copy with the tokens routed to it."""

import numpy as np
import pytest

from helpers import load_stats, padded, randomise, require

torch = require("torch")
transformers = require("transformers")
flatmerge = require("flatmerge")
from flatmerge.torch import Recording  # noqa: E402

VOCAB = 64
IMAGE = VOCAB - 1


def tiny_llava():
    text = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=16,
    )
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE)
    model = transformers.LlavaForConditionalGeneration(config)
    randomise(model, 11)
    return model.eval()


def test_llava_records_vision_and_language_layers_with_modality_codes(tmp_path):
    model = tiny_llava()
    # 28×28 pixels in 14×14 patches: 4 image tokens (the CLS feature is dropped).
    image_seqs = [[1] + [IMAGE] * 4 + [5, 6, 7], [1] + [IMAGE] * 4 + [9]]
    text_seqs = [[1, 2, 3, 4, 5, 6]]
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    seen = {}

    def probe_hook(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

        return hook

    vision_q = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    handle = model.get_submodule(vision_q).register_forward_hook(probe_hook(vision_q))
    with torch.no_grad(), Recording(model, rows=True) as rec:
        ids, mask = padded(image_seqs)
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        ids, mask = padded(text_seqs)
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    rec.save(tmp_path / "llava.stats.safetensors")
    s, meta = load_stats(tmp_path / "llava.stats.safetensors")
    # Examples with an image are vision (1), the text-only one text (0).
    np.testing.assert_array_equal(s["probe.modality"], [1, 1, 0])
    layers = {k[: -len(".count")] for k in s if k.endswith(".count")}
    assert vision_q in layers
    assert "model.multi_modal_projector.linear_1" in layers
    assert "model.language_model.layers.1.mlp.down_proj" in layers
    # The vision tower sees 2 images × (4 patches + CLS), all of them.
    assert s[f"{vision_q}.count"][0] == 10
    np.testing.assert_allclose(s[f"{vision_q}.x_mean"], torch.cat(seen[vision_q]).mean(0).numpy(), rtol=1e-6, atol=1e-7)
    # The text-only example never reached the vision tower: a zero row.
    assert np.all(s[f"{vision_q}.x_rows"][2] == 0) and np.any(s[f"{vision_q}.x_rows"][0] != 0)
    assert s["model.multi_modal_projector.linear_1.count"][0] == 8
    # Language layers: every real token, padding left out.
    lm = "model.language_model.layers.0.self_attn.q_proj"
    assert s[f"{lm}.count"][0] == sum(map(len, image_seqs + text_seqs))


class MultiwayNetwork(torch.nn.Module):
    """mPLUG-Owl2's modality-adaptive module: copy m runs the tokens whose
    index is m, gathered across the batch."""

    def __init__(self, make, copies=2):
        super().__init__()
        self.multiway = torch.nn.ModuleList([make() for _ in range(copies)])

    def forward(self, hidden_states, multiway_indices):
        out = hidden_states.new_zeros(hidden_states.shape[:-1] + (self.multiway[0].out_features,))
        for idx, subway in enumerate(self.multiway):
            local = multiway_indices.eq(idx).nonzero(as_tuple=True)
            hidden = hidden_states[local].unsqueeze(1).contiguous()
            if hidden.numel():
                out[local] = subway(hidden).squeeze(1)
        return out


class Owl(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 4)
        self.k_proj = MultiwayNetwork(lambda: torch.nn.Linear(8, 4))

    def forward(self, inputs_embeds, attention_mask, modality_indicators):
        return self.q_proj(inputs_embeds) + self.k_proj(inputs_embeds, modality_indicators)


def test_a_multiway_module_is_recorded_per_copy(tmp_path):
    torch.manual_seed(0)
    model = Owl().eval()
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    # Example 2 is text only: it never reaches copy 1.
    modality = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    with torch.no_grad(), Recording(model, rows=True, gram=True) as rec:
        model(inputs_embeds=x, attention_mask=mask, modality_indicators=modality)
    rec.save(tmp_path / "owl.stats.safetensors")
    s, _ = load_stats(tmp_path / "owl.stats.safetensors")
    assert {k[: -len(".count")] for k in s if k.endswith(".count")} == {
        "q_proj", "k_proj.multiway.0", "k_proj.multiway.1"
    }
    with torch.no_grad():
        for m in (0, 1):
            layer = f"k_proj.multiway.{m}"
            keep = (mask != 0) & (modality == m)
            xs = x[keep].double()
            ys = model.k_proj.multiway[m](x[keep]).double()
            assert s[f"{layer}.count"][0] == int(keep.sum())
            np.testing.assert_allclose(s[f"{layer}.x_mean"], xs.mean(0).numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(s[f"{layer}.y_mean"], ys.mean(0).numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(s[f"{layer}.x_gram"], (xs.T @ xs / len(xs)).numpy(), rtol=1e-6, atol=1e-7)
            for b in range(3):
                row = x[b][keep[b]].double()
                want = row.mean(0).numpy() if len(row) else np.zeros(8)
                np.testing.assert_allclose(s[f"{layer}.x_rows"][b], want, rtol=1e-6, atol=1e-7)
    assert s["q_proj.count"][0] == int(mask.sum())


def test_indices_that_do_not_fit_the_tokens_are_an_error():
    model = Owl().eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), Recording(model):
        with pytest.raises(ValueError, match="multiway indices of shape"):
            model(inputs_embeds=x, attention_mask=torch.ones(2, 3), modality_indicators=torch.zeros(2, 2, dtype=torch.long))
