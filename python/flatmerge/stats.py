"""Statistics files (SPEC §4): combining recordings of disjoint examples."""

from __future__ import annotations

import os
from typing import Iterable, Union

from . import _flatmerge

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["combine"]


def combine(paths: Iterable[PathLike], out: PathLike) -> None:
    """Combines partial states (``.part`` files: :meth:`flatmerge.Recorder.save_part`,
    ``flatmerge probe --part``) recorded on disjoint examples of one model and
    probe set with the same options into the statistics file ``out`` of their
    union, byte-identical to one recording of all the examples. An ``out``
    ending in ``.part`` is itself a combinable partial state.

    Raises :class:`flatmerge.StatsError` naming the file for parts of other
    models, probe sets or options, or sharing an example.
    """
    _flatmerge.combine([os.fspath(p) for p in paths], os.fspath(out))
