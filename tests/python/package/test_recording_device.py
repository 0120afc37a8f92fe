"""`Recording(reduce_on_device=True)`: activations summed where they are
(here torch's CPU device) into the recorder's exact fixed-point integers,
pushed as partial moments; the file must be the host path's byte for byte,
whatever the dtype, padding, batching, rows and Grams."""

import numpy as np
import pytest

from helpers import padded, require, tiny_llama

torch = require("torch")
require("transformers")
flatmerge = require("flatmerge")
from flatmerge.torch import Recording  # noqa: E402

SEQUENCES = [[1, 5, 9, 33, 2], [1, 7, 3], [1, 60, 61, 62, 10, 11, 12], [1, 4, 4, 4], [2, 9]]


def record_llama(model, path, batches, order=None, **options):
    """Records `batches` (lists of sequences) in `order` (batch indices),
    each example keeping its id from the batches' natural order."""
    starts = np.cumsum([0] + [len(b) for b in batches])
    with torch.no_grad(), Recording(model, gram=True, rows=True, model_name="tiny", **options) as rec:
        for i in order or range(len(batches)):
            ids, mask = padded(batches[i])
            with rec.batch(attention_mask=mask, example_ids=range(starts[i], starts[i + 1])):
                model(input_ids=ids, attention_mask=mask)
    rec.save(path)
    rec.save_part(path.with_name(path.name + ".part"))
    return path.read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("share", [True, False])
def test_device_sums_give_the_host_file_byte_for_byte(tmp_path, dtype, share):
    model = tiny_llama(seed=5).to(getattr(torch, dtype))
    # (The model's own arithmetic depends on the batch shape, so each
    # batching is compared with the host path of the same batching.)
    for batches in ([SEQUENCES[:2], SEQUENCES[2:]], [[s] for s in SEQUENCES], [SEQUENCES]):
        host = record_llama(model, tmp_path / "host.st", batches, share_grams=share)
        assert len(host) > 10_000
        device = record_llama(model, tmp_path / "device.st", batches, share_grams=share, reduce_on_device=True)
        assert device == host
        assert (tmp_path / "device.st.part").read_bytes() == (tmp_path / "host.st.part").read_bytes()
    # Any order of the batches: the same file (integer sums).
    batches = [SEQUENCES[:2], SEQUENCES[2:4], SEQUENCES[4:]]
    host = record_llama(model, tmp_path / "host.st", batches, share_grams=share)
    for order in ([2, 0, 1], [1, 2, 0]):
        assert record_llama(model, tmp_path / "o.st", batches, order, share_grams=share, reduce_on_device=True) == host


class Wide(torch.nn.Module):
    """One linear layer fed values of every f32 magnitude the recorder takes."""

    def __init__(self, width=12, out=5):
        super().__init__()
        self.proj = torch.nn.Linear(width, out, bias=False)

    def forward(self, inputs_embeds, attention_mask=None):
        return self.proj(inputs_embeds)


def extreme_values(shape, seed, top=30):
    """Normals scaled by 2^-75..2^top, with zeros, −0, subnormals, exact
    powers of two and values whose low bits fall below 2^-60."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g) * torch.pow(2.0, torch.randint(-75, top, shape, generator=g).float())
    flat = v.view(-1)
    flat[::17] = 0.0
    flat[5::23] = -0.0
    flat[3::29] = torch.tensor(1e-44)  # f32 subnormal
    flat[7::31] = -(2.0**-37) * 1.5
    flat[11::37] = 2.0**top
    return v


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_magnitude_and_padding_give_the_host_file(tmp_path, dtype):
    model = Wide().eval()
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(5, 12, generator=torch.Generator().manual_seed(1)))
    dt = getattr(torch, dtype)
    model = model.to(dt)
    top = 14 if dtype == "float16" else 30  # f16's range
    # The long examples make the Gram's f64 rounding depend on the order of
    # the tokens (a matmul's blocked sums differ), so the file checks it.
    batches = [extreme_values((3, 6, 12), 10, top).to(dt), extreme_values((2, 700, 12), 11, top).to(dt)]
    masks = [torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]), torch.ones(2, 700)]
    masks[1][1, 400:] = 0
    files, parts = [], []
    for reduce in (False, True):
        with torch.no_grad(), Recording(model, gram=True, rows=True, reduce_on_device=reduce) as rec:
            for x, mask in zip(batches, masks):
                model(inputs_embeds=x, attention_mask=mask)
        rec.save(tmp_path / f"{reduce}.st")
        files.append((tmp_path / f"{reduce}.st").read_bytes())
        # The partial state holds the exact integer sums themselves (the
        # file's f32 rounding would hide a last-bit difference of the f64
        # Gram).
        rec.save_part(tmp_path / f"{reduce}.part")
        parts.append((tmp_path / f"{reduce}.part").read_bytes())
    assert files[1] == files[0]
    assert parts[1] == parts[0]


def test_refused_values_raise_the_host_error_and_padding_is_not_checked():
    model = Wide().eval()
    x = torch.randn(2, 4, 12)
    x[1, 3, 7] = float("nan")
    mask = torch.ones(2, 4)
    errors = []
    for reduce in (False, True):
        with torch.no_grad(), Recording(model, gram=True, rows=True, reduce_on_device=reduce) as rec:
            with pytest.raises(flatmerge.InvalidInputError) as e:
                model(inputs_embeds=x, attention_mask=mask)
            errors.append(str(e.value))
            # The NaN is padding here: left out, so no error on either path.
            model(inputs_embeds=x, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    assert "row 3, column 7 is NaN" in errors[0]
    assert errors[1] == errors[0]
    big = torch.full((1, 2, 12), 2.0**40)  # Σ x² beyond the Gram's 2^76
    for reduce in (False, True):
        with torch.no_grad(), Recording(model, gram=True, reduce_on_device=reduce):
            with pytest.raises(flatmerge.InvalidInputError, match="beyond the Gram's range"):
                model(inputs_embeds=big)


def test_the_recorder_takes_limb_sums_directly(tmp_path):
    # q = trunc(v · 2^60): 1.5 → 3·2^59 (limb 1 holds 3·2^27), −0.25 → −2^58.
    rec = flatmerge.Recorder(rows=1)
    x = np.zeros((2, 4, 2), dtype=np.int64)
    x[0, 1, 0] = 3 << 27
    x[1, 1, 1] = 1 << 26
    y = np.zeros((2, 4, 1), dtype=np.int64)
    rec.push_moments("l", 1, x, y, 0)
    rec.save(str(tmp_path / "limbs.st"))
    ref = flatmerge.Recorder(rows=1)
    ref.push("l", np.array([[1.5, -0.25]], dtype=np.float32), np.zeros((1, 1), dtype=np.float32), 0)
    ref.save(str(tmp_path / "ref.st"))
    assert (tmp_path / "limbs.st").read_bytes() == (tmp_path / "ref.st").read_bytes()
    with pytest.raises(flatmerge.InvalidInputError, match=r"shape \[4, 2\]"):
        rec.push_moments("l", 1, x[0], y, 1)
    with pytest.raises(flatmerge.InvalidInputError, match="stores no Gram"):
        rec.add_gram_sums("l", np.zeros((4, 3), dtype=np.int64))
