"""`flatmerge.torch.Recording` on a tiny random LlamaForCausalLM against the
native probe (`flatmerge probe`) on the same tokens, padding included in
the batches and excluded from the statistics; bf16/f16 against the f32
widening."""

import json

import numpy as np
import pytest

from helpers import assert_close, gram_of, load_stats, padded, require, run_cli, tiny_llama

torch = require("torch")
require("transformers")
flatmerge = require("flatmerge")
from flatmerge.torch import Recording  # noqa: E402

SEQUENCES = [[1, 5, 9, 33, 2], [1, 7, 3], [1, 60, 61, 62, 10, 11, 12], [1, 4, 4, 4]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = tiny_llama(seed=3)
    model.save_pretrained(d / "model", safe_serialization=True)
    with open(d / "probe.jsonl", "w") as f:
        for s in SEQUENCES:
            f.write(json.dumps({"tokens": s}) + "\n")
    run_cli("probe", d / "model", "--probe-set", d / "probe.jsonl", "-o", d / "probe.stats.safetensors", "--gram", "-q")
    return model, d


def record(model, path, batches, **options):
    with torch.no_grad(), Recording(model, gram=True, rows=True, **options) as rec:
        for seqs in batches:
            ids, mask = padded(seqs)
            model(input_ids=ids, attention_mask=mask)
    rec.save(path)


def test_recording_equals_the_native_probe_with_padding_excluded(llama):
    model, d = llama
    # Batches of two, right-padded (positions then match one sequence alone).
    record(model, d / "hooks.stats.safetensors", [SEQUENCES[:2], SEQUENCES[2:]])
    probe, probe_meta = load_stats(d / "probe.stats.safetensors")
    hooks, hooks_meta = load_stats(d / "hooks.stats.safetensors")
    layers = sorted(k[: -len(".x_mean")] for k in probe if k.endswith(".x_mean"))
    assert len(layers) == 14  # q, k, v, o, gate, up, down × 2 blocks
    assert hooks_meta["examples"] == probe_meta["examples"] == str(len(SEQUENCES))
    np.testing.assert_array_equal(hooks["probe.modality"], probe["probe.modality"])
    for layer in layers:
        # Padding left out: exactly the sequences' tokens.
        assert hooks[f"{layer}.count"][0] == probe[f"{layer}.count"][0] == sum(map(len, SEQUENCES))
        for t in ("x_mean", "y_mean", "x_rows", "y_rows"):
            assert_close(hooks[f"{layer}.{t}"], probe[f"{layer}.{t}"], f"{layer}.{t}")
        assert_close(gram_of(hooks, hooks_meta, layer), gram_of(probe, probe_meta, layer), f"{layer}.x_gram")
    # Both share q/k/v's and gate/up's input Gram the same way.
    assert json.loads(hooks_meta["gram_shared"]) == json.loads(probe_meta["gram_shared"])
    # lm_head is an nn.Linear too (the probe leaves it out: SPEC §1.4).
    assert "lm_head.x_mean" in hooks


def test_batching_and_padding_do_not_change_the_means(llama, tmp_path):
    model, _ = llama
    record(model, tmp_path / "a.stats.safetensors", [[s] for s in SEQUENCES])
    record(model, tmp_path / "b.stats.safetensors", [SEQUENCES])
    a, _ = load_stats(tmp_path / "a.stats.safetensors")
    b, _ = load_stats(tmp_path / "b.stats.safetensors")
    for k in a:
        if k.endswith("count"):
            np.testing.assert_array_equal(a[k], b[k])
        elif not k.startswith("probe."):
            assert_close(b[k], a[k], k)


def test_a_mask_that_disagrees_with_the_inputs_is_an_error(llama):
    model, _ = llama
    ids, mask = padded(SEQUENCES[:2])
    with torch.no_grad(), Recording(model) as rec:
        with rec.batch(attention_mask=mask[:, :-1]):
            with pytest.raises(ValueError, match=r"attention mask is \(2, 4\)"):
                model(input_ids=ids)


def widened_record(model, path, batches, gram_shared=None):
    """The reference: each example's masked rows widened to f32 and pushed
    by hand, one push per example and layer as Recording does."""
    rec = flatmerge.Recorder(model=type(model).__name__, rows=2**63 - 1, gram=True, gram_shared=gram_shared)
    state = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(module, args, output, name=name):
                x, y, mask = args[0].float(), output.float(), state["mask"]
                for b in range(x.shape[0]):
                    keep = mask[b] != 0
                    rec.push(name, x[b][keep].numpy(), y[b][keep].numpy(), state["first"] + b, 0)

            handles.append(module.register_forward_hook(hook))
    first = 0
    with torch.no_grad():
        for seqs in batches:
            ids, mask = padded(seqs)
            state.update(mask=mask, first=first)
            model(input_ids=ids, attention_mask=mask)
            first += len(seqs)
    for h in handles:
        h.remove()
    rec.save(str(path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_equals_its_f32_widening_exactly(tmp_path, dtype):
    model = tiny_llama(seed=4).to(getattr(torch, dtype))
    batches = [SEQUENCES[:3], SEQUENCES[3:]]
    with torch.no_grad(), Recording(model, gram=True, rows=True, model_name=type(model).__name__) as rec:
        for seqs in batches:
            ids, mask = padded(seqs)
            model(input_ids=ids, attention_mask=mask)
    rec.save(tmp_path / "half.stats.safetensors")
    widened_record(model, tmp_path / "f32.stats.safetensors", batches, rec.gram_shared)
    assert (tmp_path / "half.stats.safetensors").read_bytes() == (tmp_path / "f32.stats.safetensors").read_bytes()


def test_recorder_takes_bf16_bits_and_f16_without_widening(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    y = torch.randn(5, 3, generator=g)
    files = {}
    for kind in ("f32", "bf16", "f16"):
        rec = flatmerge.Recorder(rows=1, gram=True)
        if kind == "bf16":
            xb, yb = x.bfloat16(), y.bfloat16()
            rec.push("l", xb.view(torch.int16).numpy(), yb.view(torch.int16).numpy(), 0)
            ref = flatmerge.Recorder(rows=1, gram=True)
            ref.push("l", xb.float().numpy(), yb.float().numpy(), 0)
        elif kind == "f16":
            xh, yh = x.half(), y.half()
            rec.push("l", xh.numpy(), yh.numpy(), 0)
            ref = flatmerge.Recorder(rows=1, gram=True)
            ref.push("l", xh.float().numpy(), yh.float().numpy(), 0)
        else:
            rec.push("l", x.numpy(), y.numpy(), 0)
            ref = rec
        rec.save(str(tmp_path / f"{kind}.st"))
        ref.save(str(tmp_path / f"{kind}-ref.st"))
        files[kind] = (tmp_path / f"{kind}.st").read_bytes(), (tmp_path / f"{kind}-ref.st").read_bytes()
    for kind, (got, want) in files.items():
        assert got == want, kind
    with pytest.raises(flatmerge.InvalidInputError, match="float64"):
        flatmerge.Recorder().push("l", x.double().numpy(), y.numpy(), 0)
    with pytest.raises(flatmerge.InvalidInputError, match="C-contiguous"):
        flatmerge.Recorder().push("l", x.numpy()[:, ::2], y.numpy(), 0)
