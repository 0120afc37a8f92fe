"""flatmerge: merge fine-tuned checkpoints on CPU, and record the activation
statistics its methods need from PyTorch models.

The merge engine, the statistics recorder and every format are the Rust
library's; this package converts Python values and calls it.

- :func:`merge`, :func:`plan`, :func:`inspect`: merges from a YAML path, YAML
  text or a ``dict`` in the same layout (the CLI's config reference).
- :class:`Recorder`: the statistics recorder (SPEC §4), fed numpy arrays.
- :mod:`flatmerge.torch`: :class:`~flatmerge.torch.Recording`, forward hooks
  that feed a recorder from a PyTorch model.
- :mod:`flatmerge.stats`: :func:`~flatmerge.stats.combine` of recordings of
  disjoint examples. :mod:`flatmerge.probe_set`: the mixture sampler.
- One exception class per library error kind, all subclasses of
  :class:`Error`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Union

from . import _flatmerge
from ._flatmerge import (
    CancelledError,
    ConfigError,
    Error,
    FormatError,
    InvalidInputError,
    IoError,
    NotFoundError,
    OutputExistsError,
    PickleError,
    PlanError,
    Recorder,
    StatsError,
    UnsupportedDtypeError,
)

#: The version of flatmerge (the Rust library's and this package's).
version: str = _flatmerge.__version__
__version__ = version

#: Library error kind → exception class name, in the library's order.
ERROR_KINDS: Dict[str, str] = dict(_flatmerge.ERROR_KINDS)

__all__ = [
    "version",
    "merge",
    "plan",
    "inspect",
    "Plan",
    "TensorPlan",
    "Progress",
    "Recorder",
    "Error",
    "ERROR_KINDS",
] + list(ERROR_KINDS.values())

Config = Union[str, "os.PathLike[str]", Mapping[str, Any]]


class Progress(NamedTuple):
    """Where a merge is, after one more tensor was written."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    #: The tensor just written.
    tensor: str


@dataclass(frozen=True)
class TensorPlan:
    """The plan of one output tensor (the CLI's ``--dry-run`` row)."""

    name: str
    shape: List[int]
    in_dtype: str
    out_dtype: str
    #: ``safe_m_weight``, ``safe_m_bias``, ``fallback``, ``baseline``,
    #: ``fam``, ``least_squares``, ``average`` or ``copy``.
    rule: str
    #: Contributors taking part (indices among the contributors).
    contributors: List[int]
    #: The rule's own fields (``layer``, ``reason``, …) and, where present,
    #: ``excluded`` contributors and FAM's ``source`` tensor.
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Plan:
    """The plan of a whole merge: every output tensor, in the receiver's order."""

    tensors: List[TensorPlan]
    #: Contributor tensors with no place in the receiver: ``{"contributor", "name"}``.
    dropped: List[Dict[str, Any]]
    #: Decoder layers of the output.
    layers: int
    #: Bytes of every input tensor read, and of the output tensors.
    input_bytes: int
    out_bytes: int
    #: FAM's neuron groups (empty for other methods).
    groups: List[Dict[str, Any]] = field(default_factory=list)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _yaml_scalar(value: Any) -> str:
    # JSON scalars are YAML scalars; quoting every string keeps `yes`,
    # `1e3` or `~` from changing type.
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return json.dumps(value)
    raise TypeError(f"config value {value!r} is not a string, number, bool, None, list or dict")


def _leaf(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, (list, tuple)):
        return "[]"
    return _yaml_scalar(value)


def _nested(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple)) and len(value) > 0


def _yaml_lines(value: Any, indent: str) -> List[str]:
    # Block style, one key per line, so the library's errors name useful lines.
    lines: List[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            key = json.dumps(str(k))
            if _nested(v):
                lines.append(f"{indent}{key}:")
                lines.extend(_yaml_lines(v, indent + "  "))
            else:
                lines.append(f"{indent}{key}: {_leaf(v)}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            if _nested(item):
                inner = _yaml_lines(item, indent + "  ")
                lines.append(f"{indent}- {inner[0].lstrip()}")
                lines.extend(inner[1:])
            else:
                lines.append(f"{indent}- {_leaf(item)}")
    else:
        lines.append(f"{indent}{_leaf(value)}")
    return lines


def config_to_yaml(config: Mapping[str, Any]) -> str:
    """The YAML text of a config given as a ``dict`` (mergekit's layout)."""
    return "\n".join(_yaml_lines(config, "")) + "\n"


def _config_args(config: Config, base_dir: Optional[Union[str, "os.PathLike[str]"]]) -> Dict[str, Any]:
    base = os.fspath(base_dir) if base_dir is not None else os.getcwd()
    if isinstance(config, Mapping):
        return {"yaml": config_to_yaml(config), "base_dir": base}
    if isinstance(config, os.PathLike):
        return {"path": os.fspath(config)}
    if isinstance(config, str):
        # A YAML document has a `key:`; a path to one names a file.
        if os.path.isfile(config) or ":" not in config:
            return {"path": config}
        return {"yaml": config, "base_dir": base}
    raise TypeError(f"config must be a path, YAML text or a dict, not {type(config).__name__}")


def _tqdm_progress() -> Optional[Callable[..., Any]]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    state: Dict[str, Any] = {}

    def update(tensors_done: int, tensors_total: int, bytes_done: int, bytes_total: int, tensor: str) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=bytes_total, unit="B", unit_scale=True, desc="merging")
        bar.update(bytes_done - bar.n)
        bar.set_postfix_str(f"{tensors_done}/{tensors_total} tensors")
        if tensors_done == tensors_total:
            bar.close()

    update.close = lambda: state.get("bar") and state["bar"].close()  # type: ignore[attr-defined]
    return update


def merge(
    config: Config,
    out_dir: Union[str, "os.PathLike[str]"],
    *,
    threads: Optional[int] = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Union[None, bool, Callable[[Progress], Any]] = None,
    out_dtype: Optional[str] = None,
    base_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> Union[Path, Plan]:
    """Merges the models of ``config`` into the directory ``out_dir``.

    ``config`` is a path to a YAML config, YAML text, or a ``dict`` in the
    same layout (relative paths in text or a dict resolve against
    ``base_dir``, default the current directory; in a file, against the
    file's directory). The merge runs with the GIL released on ``threads``
    worker threads (default: every core; the output is identical for any
    count). The output is written under a temporary name and renamed when
    complete: on any error, and on Ctrl-C (which raises
    :class:`KeyboardInterrupt`), nothing is left behind. ``force`` replaces an
    existing ``out_dir`` once the merge succeeded.

    ``progress``: ``None`` shows a tqdm bar when tqdm is installed, ``False``
    shows nothing, a callable is called with a :class:`Progress` after each
    tensor (on the calling thread); returning ``True`` cancels the merge
    (:class:`CancelledError`), and an exception it raises stops the merge and
    is re-raised.

    With ``dry_run`` every input is checked and the :class:`Plan` is returned
    without merging. Otherwise returns ``out_dir`` as a :class:`~pathlib.Path`.
    Errors are :class:`Error` subclasses carrying the library's message
    (file, tensor, problem).
    """
    args = _config_args(config, base_dir)
    if dry_run:
        return _plan(args)
    closer = None
    if progress is None:
        callback = _tqdm_progress()
        closer = getattr(callback, "close", None)
    elif progress is False:
        callback = None
    elif callable(progress):
        user = progress

        def callback(*values: Any) -> Any:
            return user(Progress(*values))

    else:
        raise TypeError("progress must be None, False or a callable")
    try:
        return Path(
            _flatmerge.merge(os.fspath(out_dir), threads=threads, force=force, out_dtype=out_dtype, progress=callback, **args)
        )
    finally:
        if closer is not None:
            closer()


def _plan(args: Dict[str, Any]) -> Plan:
    raw = json.loads(_flatmerge.plan(**args))
    tensors = []
    for t in raw["tensors"]:
        t = dict(t)
        tensors.append(
            TensorPlan(
                name=t.pop("name"),
                shape=t.pop("shape"),
                in_dtype=t.pop("in_dtype"),
                out_dtype=t.pop("out_dtype"),
                rule=t.pop("rule"),
                contributors=t.pop("contributors"),
                details=t,
            )
        )
    return Plan(
        tensors=tensors,
        dropped=raw["dropped"],
        layers=raw["layers"],
        input_bytes=raw["input_bytes"],
        out_bytes=raw["out_bytes"],
        groups=raw.get("groups", []),
    )


def plan(config: Config, *, base_dir: Optional[Union[str, "os.PathLike[str]"]] = None) -> Plan:
    """The per-tensor plan of a merge (``flatmerge merge --dry-run``): every
    input is opened and checked, nothing is merged. ``config`` as for
    :func:`merge`."""
    return _plan(_config_args(config, base_dir))


def inspect(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """What ``flatmerge inspect`` shows, as a dict.

    For a checkpoint (a ``.safetensors`` file, or a directory with one or
    with shards and their index): ``kind="checkpoint"``, ``tensors`` (each
    ``{"name", "dtype", "shape"}``), ``parameters``, ``bytes``, ``shards``,
    ``by_dtype``. For a statistics file: ``kind="stats"``, ``examples``,
    ``model``, ``probe``, ``modality``, ``sources`` and ``layers`` (each
    ``{"in_features", "out_features", "count", "rows", "gram", "gram_owner"}``).
    """
    return json.loads(_flatmerge.inspect(os.fspath(path)))
