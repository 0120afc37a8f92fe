# Typed stub of the native module (python/src). The public API re-exports
# these from `flatmerge` with docstrings; see python/flatmerge/__init__.py.
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

__version__: str
ERROR_KINDS: List[Tuple[str, str]]

class Error(Exception):
    file: Optional[str]
    tensor: Optional[str]
    problem: str

class IoError(Error): ...
class FormatError(Error): ...
class UnsupportedDtypeError(Error): ...
class PickleError(Error): ...
class NotFoundError(Error): ...
class StatsError(Error): ...
class ConfigError(Error): ...
class PlanError(Error): ...
class OutputExistsError(Error): ...
class InvalidInputError(Error): ...
class CancelledError(Error): ...

class Recorder:
    """The activation statistics recorder (SPEC §4).

    ``rows``: keep per-example mean rows for example ids below it (0: means
    only). ``gram``: also record each layer's input Gram. ``gram_shared``:
    alias layer → the layer whose input (and Gram) it shares. ``sources``:
    the probe sources the recording covers. ``missing_rows``: ``"zero"`` (a
    row of zeros for an example that never reached a layer) or ``"error"``.
    """

    def __init__(
        self,
        *,
        model: str = "",
        probe: str = "",
        rows: int = 0,
        gram: bool = False,
        gram_shared: Optional[Dict[str, str]] = None,
        sources: Optional[Sequence[str]] = None,
        missing_rows: str = "zero",
    ) -> None: ...
    def push(
        self,
        layer: str,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        example: int,
        modality: int = 0,
    ) -> None:
        """Adds ``x`` ``[tokens, in]`` and ``y`` ``[tokens, out]`` (or one token,
        ``[in]`` and ``[out]``) of example ``example`` through ``layer``. Arrays:
        C-contiguous float32, float16, or int16/uint16 holding bfloat16 bits,
        read in place (no copy) with the GIL released. The statistics are exact
        and do not depend on the order of pushes or the thread pushing.
        Raises InvalidInputError for NaN, infinite or out-of-range values, a
        width other than the layer's, or a modality that changes for an
        example."""
    def push_moments(
        self,
        layer: str,
        count: int,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        example: int,
        modality: int = 0,
    ) -> None:
        """Adds one example's ``count`` tokens through ``layer`` as sums
        reduced elsewhere (``Recording(reduce_on_device=True)``): ``x`` and
        ``y`` are C-contiguous int64 ``[2, 4, width]`` sums of the 32-bit limbs
        of ``q = trunc(v · 2^60)``, ``[0]`` over the non-negative values,
        ``[1]`` over the negative ones' ``|q|``. The recorder rebuilds the
        exact integers ``push`` would add, so the file is the same. A layer
        with a Gram gets it from ``add_gram_sums``."""
    def add_gram_sums(self, layer: str, sums: npt.NDArray[Any]) -> None:
        """Adds Gram sums reduced elsewhere: C-contiguous int64 ``[4, in (in +
        1) / 2]`` signed limb sums of ``trunc(g · 2^50)``, ``g`` each push's
        f64 ``XᵀX`` entry (summed over its rows in order), over the packed
        upper triangle (row ``i``: columns ``i..in``)."""
    def save(self, path: str) -> None:
        """Writes the statistics file, atomically."""
    def save_part(self, path: str) -> None:
        """Writes the exact partial state (``.part``) for ``combine``."""
    @property
    def gram_bytes(self) -> int: ...

def merge(
    out_dir: str,
    *,
    path: Optional[str] = None,
    yaml: Optional[str] = None,
    base_dir: str = ".",
    threads: Optional[int] = None,
    force: bool = False,
    out_dtype: Optional[str] = None,
    progress: Optional[Callable[[int, int, int, int, str], Any]] = None,
) -> str: ...
def plan(*, path: Optional[str] = None, yaml: Optional[str] = None, base_dir: str = ".") -> str: ...
def inspect(path: str) -> str: ...
def sample(
    files: Sequence[str],
    *,
    per_source: Optional[int] = None,
    quotas: Optional[Dict[str, int]] = None,
    seed: int = 0,
    output: Optional[str] = None,
) -> List[str]: ...
def combine(parts: Sequence[str], output: str) -> None: ...
