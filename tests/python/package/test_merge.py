"""flatmerge.merge / plan / inspect from Python against the CLI: a merge
from a dict equals the CLI's merge of the same YAML byte for byte; progress,
cancellation (nothing left behind) and the dry-run plan."""

import os
import signal

import numpy as np
import pytest

from helpers import require, run_cli, write_model

flatmerge = require("flatmerge")
require("safetensors")

CONFIG = {
    "models": [
        {"model": "./A", "parameters": {"weight": 0.7}},
        {"model": "./B", "parameters": {"weight": 0.3}},
    ],
    "merge_method": "ties",
    "base_model": "./C",
    "parameters": {"density": 0.5, "lambda": 0.9},
    "dtype": "bfloat16",
}

YAML = """\
models:
  - model: ./A
    parameters:
      weight: 0.7
  - model: ./B
    parameters:
      weight: 0.3
merge_method: ties
base_model: ./C
parameters:
  density: 0.5
  lambda: 0.9
dtype: bfloat16
"""


@pytest.fixture()
def family(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (24, 16) for i in range(12)}
    shapes["model.norm.weight"] = (16,)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    for name, scale in (("C", 0.0), ("A", 0.1), ("B", 0.2)):
        write_model(tmp_path / name, {k: v + scale * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()})
    (tmp_path / "merge.yaml").write_text(YAML)
    return tmp_path


def listing(d):
    return sorted(os.listdir(d))


def test_a_merge_from_a_dict_equals_the_cli_merge_of_the_same_yaml(family):
    run_cli("merge", family / "merge.yaml", family / "cli", "-q")
    out = flatmerge.merge(CONFIG, family / "py", base_dir=family, progress=False)
    assert out == family / "py"
    want = (family / "cli" / "model.safetensors").read_bytes()
    assert (family / "py" / "model.safetensors").read_bytes() == want
    # YAML text and the file itself, on one thread: the same bytes.
    flatmerge.merge(YAML, family / "text", base_dir=family, progress=False, threads=1)
    flatmerge.merge(family / "merge.yaml", family / "file", progress=False)
    for d in ("text", "file"):
        assert (family / d / "model.safetensors").read_bytes() == want
    assert listing(family / "py") == listing(family / "cli")


def test_progress_reaches_every_tensor_and_plan_describes_them(family):
    seen = []
    flatmerge.merge(CONFIG, family / "out", base_dir=family, progress=seen.append)
    assert all(isinstance(p, flatmerge.Progress) for p in seen)
    assert len(seen) == 13 and seen[-1].tensors_done == seen[-1].tensors_total == 13
    assert seen[-1].bytes_done == seen[-1].bytes_total
    plan = flatmerge.plan(CONFIG, base_dir=family)
    assert plan == flatmerge.merge(CONFIG, family / "dry", base_dir=family, dry_run=True)
    assert not (family / "dry").exists()
    assert len(plan) == 13 and all(isinstance(t, flatmerge.TensorPlan) for t in plan)
    up = next(t for t in plan if t.name == "model.layers.0.mlp.up_proj.weight")
    assert (up.shape, up.in_dtype, up.out_dtype, up.rule, up.contributors) == ([24, 16], "F32", "BF16", "baseline", [0, 1])
    assert plan.out_bytes == sum(t.numel * 2 for t in plan)
    info = flatmerge.inspect(family / "out")
    assert info["kind"] == "checkpoint" and info["parameters"] == 12 * 24 * 16 + 16
    assert {t["dtype"] for t in info["tensors"]} == {"BF16"}


def test_cancelling_leaves_nothing_behind(family):
    before = listing(family)
    with pytest.raises(flatmerge.CancelledError, match="cancelled"):
        flatmerge.merge(CONFIG, family / "out", base_dir=family, progress=lambda p: p.tensors_done >= 2)
    assert listing(family) == before


def test_ctrl_c_raises_keyboard_interrupt_and_leaves_nothing_behind(family):
    before = listing(family)

    def interrupt(p):
        if p.tensors_done == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        flatmerge.merge(CONFIG, family / "out", base_dir=family, progress=interrupt, threads=1)
    assert listing(family) == before


def test_an_exception_in_the_callback_stops_the_merge(family):
    before = listing(family)

    def fail(p):
        raise ZeroDivisionError("from the callback")

    with pytest.raises(ZeroDivisionError, match="from the callback"):
        flatmerge.merge(CONFIG, family / "out", base_dir=family, progress=fail)
    assert listing(family) == before


def test_dict_configs_keep_their_types():
    text = flatmerge.config_to_yaml({"a": "yes", "b": [1, 2.5, None, True], "c": {"d": []}, "e": [{"f": "~"}]})
    assert text == '"a": "yes"\n"b":\n  - 1\n  - 2.5\n  - null\n  - true\n"c":\n  "d": []\n"e":\n  - "f": "~"\n'
