"""`Recording` on a model dispatched by `accelerate` (device maps with
offload hooks; CPU and disk here): the hooks must not assume where a
module's weights or inputs live, and the file must be the plain model's,
byte for byte."""

import pytest

from helpers import padded, require, tiny_llama

torch = require("torch")
require("transformers")
accelerate = require("accelerate")
require("flatmerge")
from flatmerge.torch import Recording  # noqa: E402

SEQUENCES = [[1, 5, 9, 33, 2], [1, 7, 3], [1, 60, 61, 62, 10, 11, 12], [1, 4, 4, 4]]


def record(model, path, **options):
    with torch.no_grad(), Recording(model, gram=True, rows=True, model_name="tiny", **options) as rec:
        for seqs in (SEQUENCES[:2], SEQUENCES[2:]):
            ids, mask = padded(seqs)
            model(input_ids=ids, attention_mask=mask)
    rec.save(path)
    return path.read_bytes()


def dispatched(kind, offload_dir):
    model = tiny_llama(seed=3)
    if kind == "cpu_offload":
        # Every weight on the meta device, moved in by a hook per call.
        return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    if kind == "disk_offload":
        return accelerate.disk_offload(model, offload_dir, execution_device=torch.device("cpu"))
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "disk",
    }
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=offload_dir, force_hooks=True)


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload", "device_map"])
@pytest.mark.parametrize("reduce", [False, True])
def test_a_dispatched_model_records_the_plain_models_file(tmp_path, kind, reduce):
    plain = record(tiny_llama(seed=3), tmp_path / "plain.st")
    model = dispatched(kind, tmp_path / "offload")
    # The hooks are really there and the weights really away.
    assert hasattr(model.model.layers[1].self_attn.q_proj, "_hf_hook")
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert record(model, tmp_path / f"{kind}.st", reduce_on_device=reduce) == plain
