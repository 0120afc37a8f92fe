"""Probe sets (JSON Lines, one example per line): the meta-probe mixture sampler."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from . import _flatmerge

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["sample"]


def sample(
    files: Iterable[PathLike],
    *,
    per_source: Optional[int] = None,
    quotas: Optional[Mapping[str, int]] = None,
    seed: int = 0,
    output: Optional[PathLike] = None,
) -> List[Dict[str, Any]]:
    """Draws the meta-probe mixture (``flatmerge probe-set sample``): from each
    source, its quota of examples (``quotas[source]``, else ``per_source``;
    sources with neither are left out), uniformly without replacement, then
    shuffles the mixture. The same seed gives the same mixture. An example
    without ``"source"`` takes its file's stem.

    Returns the examples as dicts (the probe-set lines) and writes them to
    ``output`` when given.
    """
    lines = _flatmerge.sample(
        [os.fspath(f) for f in files],
        per_source=per_source,
        quotas=dict(quotas) if quotas is not None else None,
        seed=seed,
        output=os.fspath(output) if output is not None else None,
    )
    return [json.loads(line) for line in lines]
