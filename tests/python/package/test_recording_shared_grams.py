"""`Recording(gram=True)` stores one Gram per shared input: q/k/v and
gate/up read one tensor, so k_proj, v_proj and up_proj are `gram_shared`
aliases (SPEC §4), as in the native probe's files. Readers resolve them:
a RegMean merge reading the shared file writes the bytes it writes from
a file with every Gram duplicated."""

import json
import struct

import numpy as np
import pytest

from helpers import gram_of, load_stats, padded, require, tiny_llama

torch = require("torch")
require("transformers")
require("safetensors")
flatmerge = require("flatmerge")
from flatmerge.torch import Recording  # noqa: E402

SEQUENCES = [[1, 5, 9, 33, 2], [1, 7, 3], [1, 60, 61, 62, 10, 11, 12], [1, 4, 4, 4]]


def record(model, path, **options):
    with torch.no_grad(), Recording(model, gram=True, model_name="tiny", **options) as rec:
        for seqs in (SEQUENCES[:2], SEQUENCES[2:]):
            ids, mask = padded(seqs)
            model(input_ids=ids, attention_mask=mask)
        held = rec.recorder.gram_bytes
    rec.save(path)
    return rec, held


def data_bytes(path):
    """Bytes of a safetensors file's tensor data (after its header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - n


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    out = {}
    for name, seed in (("A", 3), ("B", 4)):
        model = tiny_llama(seed=seed)
        model.save_pretrained(d / name, safe_serialization=True)
        for share in (True, False):
            path = d / f"{name}.{'shared' if share else 'full'}.stats.safetensors"
            rec, held = record(model, path, share_grams=share)
            out[name, share] = path, rec, held
    return d, out


def test_one_gram_per_shared_input_and_the_aliases_resolve_to_equal_grams(recorded):
    _, out = recorded
    (shared_path, rec, shared_held), (full_path, _, full_held) = out["A", True], out["A", False]
    shared, meta = load_stats(shared_path)
    full, full_meta = load_stats(full_path)
    want = {}
    for n in range(2):
        p = f"model.layers.{n}."
        want.update({p + "self_attn.k_proj": p + "self_attn.q_proj", p + "self_attn.v_proj": p + "self_attn.q_proj"})
        want[p + "mlp.up_proj"] = p + "mlp.gate_proj"
    assert json.loads(meta["gram_shared"]) == want == rec.gram_shared
    assert "gram_shared" not in full_meta
    stored = sorted(k[: -len(".x_gram")] for k in shared if k.endswith(".x_gram"))
    # Per block q (for k, v), o, gate (for up), down; and lm_head.
    assert len(stored) == 2 * 4 + 1 and not set(stored) & set(want)
    assert len([k for k in full if k.endswith(".x_gram")]) == 2 * 7 + 1
    for layer in {k[: -len(".x_mean")] for k in full if k.endswith(".x_mean")}:
        # Bit for bit: an alias's own Gram is its owner's (one input).
        np.testing.assert_array_equal(gram_of(shared, meta, layer), full[f"{layer}.x_gram"])
        for t in ("x_mean", "y_mean", "count"):
            np.testing.assert_array_equal(shared[f"{layer}.{t}"], full[f"{layer}.{t}"])
    # The saving: six 32×32 f32 Grams fewer in the file, and six
    # accumulators of 16 bytes per upper-triangle entry fewer in memory.
    assert data_bytes(full_path) - data_bytes(shared_path) == 6 * 4 * 32 * 32
    assert full_held - shared_held == 6 * 16 * (32 * 33 // 2)
    print(
        f"Grams: file data {data_bytes(full_path)} -> {data_bytes(shared_path)} bytes, "
        f"accumulators {full_held} -> {shared_held} bytes"
    )


def test_regmean_reading_shared_grams_writes_the_bytes_of_duplicated_grams(recorded):
    d, out = recorded
    merged = {}
    for share in (True, False):
        config = {
            "merge_method": "regmean",
            "models": [
                {"model": str(d / "A"), "stats": str(out["A", share][0])},
                {"model": str(d / "B"), "stats": str(out["B", share][0]), "parameters": {"weight": 0.5}},
            ],
            "parameters": {"alpha": 0.9},
        }
        target = d / f"merged-{share}"
        flatmerge.merge(config, target, progress=False)
        merged[share] = {p.name: p.read_bytes() for p in sorted(target.glob("*.safetensors"))}
    assert merged[True] and merged[True] == merged[False]


class Multiway(torch.nn.Module):
    def __init__(self, copies=2):
        super().__init__()
        self.multiway = torch.nn.ModuleList([torch.nn.Linear(8, 4) for _ in range(copies)])

    def forward(self, hidden_states, multiway_indices):
        out = hidden_states.new_zeros(hidden_states.shape[:-1] + (4,))
        for m, copy in enumerate(self.multiway):
            keep = multiway_indices == m
            out[keep] = copy(hidden_states[keep])
        return out


class Owl(torch.nn.Module):
    """mPLUG-Owl2's attention: q_proj sees every token, k/v are per modality."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 4)
        self.k_proj = Multiway()
        self.v_proj = Multiway()

    def forward(self, inputs_embeds, attention_mask, modality_indicators):
        x = inputs_embeds
        return self.q_proj(x) + self.k_proj(x, modality_indicators) + self.v_proj(x, modality_indicators)


def test_multiway_copies_share_copy_by_copy(tmp_path):
    torch.manual_seed(0)
    model = Owl().eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    modality = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 1, 0]])
    files = {}
    for share in (True, False):
        with torch.no_grad(), Recording(model, gram=True, share_grams=share) as rec:
            model(inputs_embeds=x, attention_mask=mask, modality_indicators=modality)
        rec.save(tmp_path / f"{share}.st")
        files[share] = load_stats(tmp_path / f"{share}.st")
    (s, meta), (f, _) = files[True], files[False]
    # A plain q_proj cannot own a copy's Gram (the copy sees only its tokens).
    assert json.loads(meta["gram_shared"]) == {"v_proj.multiway.0": "k_proj.multiway.0", "v_proj.multiway.1": "k_proj.multiway.1"}
    for m in (0, 1):
        np.testing.assert_array_equal(gram_of(s, meta, f"v_proj.multiway.{m}"), f[f"v_proj.multiway.{m}.x_gram"])


class CrossAttention(torch.nn.Module):
    """q reads the decoder's states, k/v the encoder's: nothing to share."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.k_proj = torch.nn.Linear(8, 8)
        self.v_proj = torch.nn.Linear(8, 8)

    def forward(self, inputs_embeds, encoder_hidden_states):
        return self.q_proj(inputs_embeds) + self.k_proj(encoder_hidden_states) + self.v_proj(encoder_hidden_states)


def test_modules_that_read_different_inputs_are_an_error_not_a_wrong_gram(tmp_path):
    model = CrossAttention().eval()
    x, enc = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad(), Recording(model, gram=True) as rec:
        with pytest.raises(ValueError, match=r"`k_proj` and `q_proj` share one Gram .* different inputs"):
            model(inputs_embeds=x, encoder_hidden_states=enc)
    # Said explicitly: v shares k's (they do read one input).
    with torch.no_grad(), Recording(model, gram=True, share_grams={"v_proj": "k_proj"}) as rec:
        model(inputs_embeds=x, encoder_hidden_states=enc)
    rec.save(tmp_path / "cross.st")
    s, meta = load_stats(tmp_path / "cross.st")
    assert json.loads(meta["gram_shared"]) == {"v_proj": "k_proj"}
    assert sorted(k for k in s if k.endswith(".x_gram")) == ["k_proj.x_gram", "q_proj.x_gram"]
    with pytest.raises(ValueError, match="`w_proj` is not a recorded layer"):
        Recording(model, gram=True, share_grams={"w_proj": "q_proj"})
    # Without Grams there is nothing to share.
    assert Recording(model).gram_shared == {}


class Copied(torch.nn.Module):
    """k_proj reads a copy of q_proj's input: equal values, another tensor."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.k_proj = torch.nn.Linear(8, 8)

    def forward(self, inputs_embeds):
        return self.q_proj(inputs_embeds) + self.k_proj(inputs_embeds.clone())


def test_equal_inputs_in_other_tensors_share_too(tmp_path):
    model = Copied().eval()
    with torch.no_grad(), Recording(model, gram=True) as rec:
        model(inputs_embeds=torch.randn(2, 3, 8))
        model(inputs_embeds=torch.randn(1, 4, 8))
    rec.save(tmp_path / "copied.st")
    assert json.loads(load_stats(tmp_path / "copied.st")[1]["gram_shared"]) == {"k_proj": "q_proj"}
