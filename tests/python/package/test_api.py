"""The helpers: the mixture sampler against the CLI's, the version, the
package's typing files."""

import json
from pathlib import Path

from helpers import require, run_cli

flatmerge = require("flatmerge")
import flatmerge.probe_set  # noqa: E402


def test_sample_equals_the_cli_mixture(tmp_path):
    for source, n in (("sst2", 6), ("vqa", 4)):
        with open(tmp_path / f"{source}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"tokens": [1, i + 2], "modality": "vision" if source == "vqa" else "text"}) + "\n")
    files = [tmp_path / "sst2.jsonl", tmp_path / "vqa.jsonl"]
    got = flatmerge.probe_set.sample(files, per_source=2, quotas={"vqa": 3}, seed=7, output=tmp_path / "py.jsonl")
    run_cli("probe-set", "sample", *files, "--per-source", "2", "--quota", "vqa=3", "--seed", "7", "-o", tmp_path / "cli.jsonl", "-q")
    assert (tmp_path / "py.jsonl").read_bytes() == (tmp_path / "cli.jsonl").read_bytes()
    assert sorted(e["source"] for e in got) == ["sst2", "sst2", "vqa", "vqa", "vqa"]
    assert got == [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]


def test_version_and_typing_files():
    out = run_cli("--version").stdout.split()
    assert flatmerge.version == flatmerge.__version__ == out[-1]
    package = Path(flatmerge.__file__).parent
    assert (package / "py.typed").is_file() and (package / "_flatmerge.pyi").is_file()
