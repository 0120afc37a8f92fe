"""Every library error kind arrives as its own exception class (a subclass
of flatmerge.Error) with the library's message: file, tensor, problem."""

import numpy as np
import pytest

from helpers import require, write_model

flatmerge = require("flatmerge")
require("safetensors")


def linear(*models, **extra):
    return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}


def raised(call):
    with pytest.raises(flatmerge.Error) as info:
        call()
    return info.value


@pytest.fixture()
def cases(tmp_path):
    ok = {"w.weight": np.ones((2, 2), np.float32)}
    write_model(tmp_path / "A", ok)
    write_model(tmp_path / "B", ok)
    write_model(tmp_path / "I", {"w.weight": np.ones((2, 2), np.int32)})
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    rec = flatmerge.Recorder()
    rec.push("l", np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), 0)
    rec.save(str(tmp_path / "stats.safetensors"))
    t = tmp_path

    def merge(config, out="out", **kw):
        return lambda: flatmerge.merge(config, t / out, base_dir=t, progress=False, **kw)

    return {
        "Io": (merge(t / "missing.yaml"), "missing.yaml"),
        "Format": (lambda: flatmerge.inspect(t / "garbage.safetensors"), "garbage.safetensors"),
        "UnsupportedDtype": (merge(linear("./A", "./I")), "w.weight"),
        "Pickle": (lambda: flatmerge.inspect(t / "pickled"), "pickled"),
        "NotFound": (lambda: flatmerge.inspect(t / "empty"), "empty"),
        "Stats": (lambda: flatmerge.stats.combine([t / "stats.safetensors", t / "stats.safetensors"], t / "c.st"), "stats.safetensors"),
        "Config": (merge(linear("./A", "./B", colour="blue")), "colour"),
        "Plan": (merge(linear("./nowhere1", "./nowhere2")), "2 problems"),
        "OutputExists": (merge(linear("./A", "./B"), out="exists"), "exists"),
        "InvalidInput": (lambda: rec.push("l", np.full((1, 2), np.inf, np.float32), np.ones((1, 2), np.float32), 1), "infinite"),
        "Cancelled": (lambda: flatmerge.merge(linear("./A", "./B"), t / "c", base_dir=t, progress=lambda p: True), "cancelled"),
    }


def test_every_error_kind_maps_to_its_exception(cases):
    import flatmerge.stats  # noqa: F401

    # A kind added to the library must get a case here.
    assert set(cases) == set(flatmerge.ERROR_KINDS)
    for kind, (call, needle) in cases.items():
        err = raised(call)
        cls = getattr(flatmerge, flatmerge.ERROR_KINDS[kind])
        assert type(err) is cls, f"{kind}: {type(err).__name__}: {err}"
        assert issubclass(cls, flatmerge.Error) and cls is not flatmerge.Error
        assert needle in str(err), f"{kind}: {err}"
        # The parts of the message are there separately too.
        assert err.problem and err.problem in str(err)
        if err.file is not None:
            assert str(err).startswith(err.file)
        if err.tensor is not None:
            assert f"`{err.tensor}`" in str(err)


def test_a_bad_tensor_is_named_with_its_file(cases, tmp_path):
    err = raised(cases["UnsupportedDtype"][0])
    assert err.tensor == "w.weight" and err.file.endswith("I")
    assert "cannot be merged" in err.problem


def test_bad_arguments_are_errors_not_crashes(tmp_path):
    with pytest.raises(flatmerge.InvalidInputError, match="threads"):
        flatmerge.merge({"merge_method": "linear"}, tmp_path / "o", threads=0)
    with pytest.raises(flatmerge.InvalidInputError, match="missing_rows"):
        flatmerge.Recorder(missing_rows="maybe")
    with pytest.raises(flatmerge.InvalidInputError, match="rows"):
        flatmerge.Recorder().push("l", np.ones((2, 3), np.float32), np.ones((3, 3), np.float32), 0)
    with pytest.raises(flatmerge.InvalidInputError, match="shape"):
        flatmerge.Recorder().push("l", np.ones((2, 3, 1), np.float32), np.ones((2, 3), np.float32), 0)
    with pytest.raises(TypeError):
        flatmerge.merge(42, tmp_path / "o")
