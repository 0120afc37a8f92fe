"""Data-parallel recording: two gloo processes on 127.0.0.1 give a file
byte-identical to one process recording the same batches; parts recorded
separately combine to the same bytes with flatmerge.stats.combine."""

import os
import socket
import subprocess
import sys

from helpers import require

torch = require("torch")
require("transformers")
flatmerge = require("flatmerge")
import flatmerge.stats  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dp_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out, world):
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(out), str(r), str(world), str(port)], stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def test_two_gloo_ranks_equal_one_process_byte_for_byte(tmp_path):
    run(tmp_path / "one.stats.safetensors", 1)
    run(tmp_path / "two.stats.safetensors", 2)
    one = (tmp_path / "one.stats.safetensors").read_bytes()
    assert one == (tmp_path / "two.stats.safetensors").read_bytes()
    meta = flatmerge.inspect(tmp_path / "one.stats.safetensors")
    assert meta["examples"] == 8 and meta["sources"] == ["dp"]


def test_parts_combine_to_the_single_recording(tmp_path):
    rng = torch.Generator().manual_seed(2)
    data = [(torch.randn(3, 4, generator=rng), torch.randn(3, 2, generator=rng)) for _ in range(4)]
    whole = flatmerge.Recorder(rows=4, gram=True)
    parts = [flatmerge.Recorder(rows=4, gram=True) for _ in range(2)]
    for n, (x, y) in enumerate(data):
        whole.push("layer", x.numpy(), y.numpy(), n)
        parts[n % 2].push("layer", x.numpy(), y.numpy(), n)
    whole.save(str(tmp_path / "whole.st"))
    for k, p in enumerate(parts):
        p.save_part(str(tmp_path / f"{k}.part"))
    flatmerge.stats.combine([tmp_path / "0.part", tmp_path / "1.part"], tmp_path / "combined.st")
    assert (tmp_path / "whole.st").read_bytes() == (tmp_path / "combined.st").read_bytes()
    # The same part twice shares every example: refused, naming the file.
    try:
        flatmerge.stats.combine([tmp_path / "0.part", tmp_path / "0.part"], tmp_path / "bad.st")
    except flatmerge.StatsError as e:
        assert "0.part" in str(e) and "disjoint" in str(e)
    else:
        raise AssertionError("overlapping parts were combined")
    assert not (tmp_path / "bad.st").exists()
