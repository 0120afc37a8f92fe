"""Recording activation statistics from a PyTorch model with forward hooks.

:class:`Recording` hooks every ``nn.Linear`` of a model (or the modules
whose names match a pattern) and streams each layer's inputs and outputs to
a :class:`flatmerge.Recorder`, one push per example and layer, so the file
is the one the native probes write (SPEC §4) and does not depend on how the
examples were batched, ordered or spread over processes.

Tokens and examples: a hooked input ``x`` of shape ``[B, T, in]`` whose
leading dimensions are the attention mask's ``[B, T]`` is split into the
``B`` examples, and the mask's zeros (padding) are left out. Modules that
do not run on the text sequence (a vision tower's patches, a projector:
names matching ``unmasked``) keep every token of ``[B, S, in]`` as example
``b``'s. Any other shape is an error naming the module and both shapes —
the recording never guesses which token belongs to which example.

Values are copied to the host as they are (bf16 as its bit pattern, f16,
f32), so the statistics are exactly those of the f32 widening, whatever the
device; modules may sit on different devices (``accelerate`` device maps).
"""

from __future__ import annotations

import contextlib
import inspect as _inspect
import os
import re
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Pattern, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import _flatmerge
from . import stats as _stats

__all__ = ["Recording", "MODALITIES", "DEFAULT_UNMASKED"]

#: Modality names and their codes (``probe.modality``).
MODALITIES: Dict[str, int] = {"text": 0, "vision": 1, "audio": 2}

#: Modules that see image patches or image features rather than the text
#: sequence: LLaVA's ``vision_tower`` and ``multi_modal_projector``,
#: mPLUG-Owl2's ``vision_model`` and ``visual_abstractor``, Qwen2-VL's
#: ``visual``, LLaVA-1.5's ``mm_projector``.
DEFAULT_UNMASKED = r"(^|\.)(vision_tower|vision_model|visual_abstractor|visual|multi_modal_projector|mm_projector)(\.|$)"

Patterns = Union[None, str, Pattern[str], Sequence[Union[str, Pattern[str]]], Callable[[str, nn.Module], bool]]


def _modality_code(value: Union[int, str]) -> int:
    if isinstance(value, str):
        if value not in MODALITIES:
            raise ValueError(f"modality {value!r} is not one of {sorted(MODALITIES)} or a code 0–255")
        return MODALITIES[value]
    code = int(value)
    if not 0 <= code <= 255:
        raise ValueError(f"modality code {code} is not in 0–255")
    return code


def _matcher(patterns: Patterns) -> Callable[[str, nn.Module], bool]:
    if patterns is None:
        return lambda name, module: True
    if callable(patterns) and not isinstance(patterns, (str, re.Pattern)):
        return patterns  # type: ignore[return-value]
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    compiled = [re.compile(p) if isinstance(p, str) else p for p in patterns]  # type: ignore[union-attr]
    return lambda name, module: any(p.search(name) for p in compiled)


def _host_array(t: torch.Tensor, layer: str, which: str) -> np.ndarray:
    """The tensor's values on the host, without widening: f32 and f16 as
    they are, bf16 as its int16 bit pattern (numpy has no bf16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype not in (torch.float32, torch.float16):
        raise _flatmerge.InvalidInputError(
            f"`{layer}`: {which} has dtype {t.dtype}; flatmerge records float32, float16 and bfloat16 activations"
        )
    return t.to("cpu").contiguous().numpy()


class _Batch:
    """What the hooks need to know about the batch in flight."""

    def __init__(self, mask: Optional[torch.Tensor], ids: Optional[List[int]], modality: List[int], size: Optional[int]):
        self.mask = mask  # bool [B, T] on the host, or None
        self.ids = ids  # example ids, or None until the size is known
        self.modality = modality  # per example, or one value for all
        self.size = size
        self.modality_indices: Optional[torch.Tensor] = None
        self.device_masks: Dict[torch.device, torch.Tensor] = {}

    def mask_on(self, device: torch.device) -> torch.Tensor:
        # One copy of the mask per device the model is spread over.
        assert self.mask is not None
        m = self.device_masks.get(device)
        if m is None:
            m = self.device_masks[device] = self.mask.to(device)
        return m


class Recording:
    """Records the activation statistics of ``model``'s forward passes while
    the context is open; :meth:`save` writes the SPEC §4 file.

    ``modules``: which modules to hook — ``None`` for every ``nn.Linear``, or
    regular expressions (searched in the module names), or a callable
    ``(name, module) -> bool``. Layers are named by the module's qualified
    name, which is the checkpoint's tensor name without ``.weight`` for Hugging
    Face models. A module with copies per modality (mPLUG-Owl2's
    ``MultiwayNetwork``: a ``multiway`` ``ModuleList`` of ``nn.Linear`` called as
    ``module(hidden_states, multiway_indices)``) is hooked as a whole, and copy
    ``m`` records the tokens routed to it as layer ``<name>.multiway.<m>``.

    ``gram``: also record each layer's input second moment ``x_gram`` (SPEC
    §4 version 2; least-squares merging). ``rows``: keep the per-example mean
    rows ``x_rows``/``y_rows`` (``True`` for every example, or the number of
    leading example ids to keep). ``source``: the probe source the recorded
    examples come from (the file's ``sources``; RegMean's protocol records
    each model on its own task). ``modality``: the examples' modality (``"text"``,
    ``"vision"``, ``"audio"`` or a code); ``None`` means vision (1) for a
    forward call given ``pixel_values`` and text (0) otherwise.

    Each forward call of ``model`` is one batch. Its attention mask is the
    ``attention_mask`` argument of the call, or the one given to
    :meth:`batch`; its example ids count on from the previous batch (under
    ``torch.distributed``, example ``j`` of rank ``r`` of ``W`` is ``j·W + r``,
    ``DistributedSampler``'s order without shuffling) unless :meth:`batch`
    gives them. ``unmasked``: modules whose inputs are not the text sequence
    (default :data:`DEFAULT_UNMASKED`); their ``[B, S, in]`` inputs count
    every token for example ``b``.

    ``distributed``: combine the ranks' statistics onto rank 0 in :meth:`save`
    (default: when ``torch.distributed`` is initialised with more than one
    rank). The combined file is byte-identical to a single-process recording
    of the same batches.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: Patterns = None,
        gram: bool = False,
        rows: Union[bool, int] = False,
        source: Optional[str] = None,
        modality: Union[None, int, str] = None,
        unmasked: Patterns = DEFAULT_UNMASKED,
        model_name: Optional[str] = None,
        probe: str = "",
        distributed: Optional[bool] = None,
    ) -> None:
        self.model = model
        self._modality = None if modality is None else _modality_code(modality)
        self._unmasked = _matcher(unmasked)
        if rows is True:
            max_rows = 2**63 - 1
        elif rows is False:
            max_rows = 0
        else:
            max_rows = int(rows)
        name = model_name
        if name is None:
            config = getattr(model, "config", None)
            name = getattr(config, "_name_or_path", "") or type(model).__name__
        self.recorder = _flatmerge.Recorder(
            model=name,
            probe=probe,
            rows=max_rows,
            gram=gram,
            sources=[source] if source is not None else None,
        )
        self._distributed = distributed
        self._choose = _matcher(modules)
        self._handles: List[Any] = []
        self._batch: Optional[_Batch] = None
        self._explicit: Optional[Dict[str, Any]] = None
        self._next_local = 0
        self._signature = None
        try:
            self._signature = _inspect.signature(model.forward)
        except (TypeError, ValueError):
            pass

    # -- hooks ---------------------------------------------------------------

    def __enter__(self) -> "Recording":
        if self._handles:
            raise RuntimeError("this Recording is already open")
        multiway_children = set()
        targets: List[Tuple[str, nn.Module, bool]] = []
        for name, module in self.model.named_modules():
            copies = getattr(module, "multiway", None)
            if isinstance(copies, nn.ModuleList) and len(copies) > 0 and all(isinstance(c, nn.Linear) for c in copies):
                for c in copies:
                    multiway_children.add(id(c))
                if self._choose(name, module):
                    targets.append((name, module, True))
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and id(module) not in multiway_children and self._choose(name, module):
                targets.append((name, module, False))
        if not targets:
            raise ValueError("no module of the model matches `modules`: nothing would be recorded")
        self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end, always_call=True))
        for name, module, multiway in targets:
            hook = self._multiway_hook(name) if multiway else self._linear_hook(name)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Removes the hooks (the recorded statistics stay)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batch = None

    @contextlib.contextmanager
    def batch(
        self,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        example_ids: Optional[Sequence[int]] = None,
        modality: Union[None, int, str, Sequence[Union[int, str]]] = None,
    ) -> Iterator[None]:
        """Gives the next forward call's attention mask (``[B, T]``, nonzero for
        real tokens), example ids and modality (one for all, or per example),
        overriding the call's own ``attention_mask`` and the running ids. Also
        lets hooked submodules be called directly, outside a forward call of the
        whole model."""
        if self._explicit is not None:
            raise RuntimeError("Recording.batch contexts do not nest")
        self._explicit = {"attention_mask": attention_mask, "example_ids": example_ids, "modality": modality}
        try:
            yield
        finally:
            self._explicit = None
            self._batch = None

    def _bound_arguments(self, args: tuple, kwargs: dict) -> Dict[str, Any]:
        if self._signature is not None:
            try:
                return dict(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        return dict(kwargs)

    def _make_batch(self, arguments: Dict[str, Any]) -> _Batch:
        explicit = self._explicit or {}
        mask = explicit.get("attention_mask")
        if mask is None:
            mask = arguments.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"the attention mask must be a [batch, tokens] tensor, not {shape}: give a 2-D mask to Recording.batch"
                )
            mask = mask.detach().to("cpu") != 0
        size = None
        if mask is not None:
            size = mask.shape[0]
        else:
            for key in ("input_ids", "inputs_embeds", "pixel_values"):
                v = arguments.get(key)
                if isinstance(v, torch.Tensor):
                    size = v.shape[0]
                    break
        ids = explicit.get("example_ids")
        if ids is not None:
            ids = [int(i) for i in ids]
            if size is not None and len(ids) != size:
                raise ValueError(f"{len(ids)} example ids for a batch of {size} examples")
            size = len(ids) if size is None else size
        modality = explicit.get("modality")
        if modality is None:
            if self._modality is not None:
                modality = self._modality
            else:
                modality = MODALITIES["vision"] if arguments.get("pixel_values") is not None else MODALITIES["text"]
        if isinstance(modality, (list, tuple)):
            codes = [_modality_code(m) for m in modality]
            if size is not None and len(codes) != size:
                raise ValueError(f"{len(codes)} modalities for a batch of {size} examples")
        else:
            codes = [_modality_code(modality)]
        batch = _Batch(mask, ids, codes, size)
        if size is not None:
            self._assign_ids(batch, size)
        return batch

    def _rank(self) -> Tuple[int, int]:
        if self._distributed is False:
            return 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _assign_ids(self, batch: _Batch, size: int) -> None:
        batch.size = size
        if batch.ids is None:
            rank, world = self._rank()
            batch.ids = [(self._next_local + j) * world + rank for j in range(size)]
            self._next_local += size
        if len(batch.modality) == 1 and size != 1:
            batch.modality = batch.modality * size
        if len(batch.modality) != size:
            raise ValueError(f"{len(batch.modality)} modalities for a batch of {size} examples")

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._batch is not None:
            # A nested call of the model itself, or a second call inside one
            # Recording.batch context: the same batch.
            return
        self._batch = self._make_batch(self._bound_arguments(args, kwargs))

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Inside Recording.batch the batch lasts until the context closes.
        if self._explicit is None:
            self._batch = None

    def _current(self, layer: str, leading: int) -> _Batch:
        if self._batch is None and self._explicit is not None:
            # A hooked submodule called directly inside Recording.batch.
            self._batch = self._make_batch({})
        batch = self._batch
        if batch is None:
            raise RuntimeError(
                f"`{layer}` ran outside a forward call of the recorded model: call the model, "
                "or wrap the call in `with recording.batch(...)`"
            )
        if batch.size is None:
            # No mask, ids or inputs told the batch size: the first hooked
            # input's leading dimension does.
            self._assign_ids(batch, leading)
        return batch

    # -- pushing -------------------------------------------------------------

    def _push_tokens(self, layer: str, x: torch.Tensor, y: torch.Tensor, batch: _Batch, counts: List[int]) -> None:
        """Pushes packed rows: example ``b`` owns ``counts[b]`` consecutive rows."""
        hx = _host_array(x, layer, "the input")
        hy = _host_array(y, layer, "the output")
        start = 0
        assert batch.ids is not None
        for b, n in enumerate(counts):
            if n:
                self.recorder.push(layer, hx[start : start + n], hy[start : start + n], batch.ids[b], batch.modality[b])
            start += n

    def _tokens(
        self, layer: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, select: Optional[torch.Tensor] = None
    ) -> None:
        """Splits ``x`` ``[B, T, in]`` and ``y`` ``[B, T, out]`` into examples,
        keeping the tokens of the mask (and of ``select``, a ``[B, T]`` bool
        routing of multiway copies) and pushes them."""
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(f"`{layer}`: input {tuple(x.shape)} and output {tuple(y.shape)} disagree in their leading dimensions")
        if x.dim() == 2:
            # One token per example ([B, in]: a pooled head).
            x, y = x.unsqueeze(1), y.unsqueeze(1)
            if select is not None:
                select = select.reshape(x.shape[0], 1)
        if x.dim() != 3:
            raise ValueError(
                f"`{layer}`: input of shape {tuple(x.shape)}: the recording needs [batch, tokens, features] to tell examples apart"
            )
        batch = self._current(layer, x.shape[0])
        B, T = x.shape[0], x.shape[1]
        if B != batch.size:
            raise ValueError(
                f"`{layer}`: input of shape {tuple(x.shape)} for a batch of {batch.size} examples: "
                "the recording cannot tell which example each row belongs to"
            )
        keep: Optional[torch.Tensor] = None
        if batch.mask is not None and not self._unmasked(layer, module):
            if tuple(batch.mask.shape) != (B, T):
                raise ValueError(
                    f"`{layer}`: input of shape {tuple(x.shape)} but the attention mask is {tuple(batch.mask.shape)}: "
                    "they must agree in [batch, tokens] (for modules outside the text sequence, "
                    "name them in `unmasked`)"
                )
            keep = batch.mask_on(x.device)
        if select is not None:
            keep = select if keep is None else keep & select
        if keep is None:
            self._push_tokens(layer, x.reshape(B * T, -1), y.reshape(B * T, -1), batch, [T] * B)
            return
        counts = keep.sum(dim=1).tolist()
        self._push_tokens(layer, x[keep], y[keep], batch, [int(c) for c in counts])

    def _linear_hook(self, layer: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise TypeError(f"`{layer}`: a hooked linear layer must take and return tensors")
            with torch.no_grad():
                self._tokens(layer, module, x, output)

        return hook

    def _multiway_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            indices = args[1] if len(args) > 1 else kwargs.get("multiway_indices")
            if isinstance(output, tuple):
                output = output[0]
            if not isinstance(x, torch.Tensor) or not isinstance(indices, torch.Tensor):
                raise TypeError(f"`{name}`: a multiway module is called as module(hidden_states, multiway_indices)")
            if tuple(indices.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"`{name}`: multiway indices of shape {tuple(indices.shape)} for input {tuple(x.shape)}: "
                    "one index per token"
                )
            with torch.no_grad():
                for m in range(len(module.multiway)):
                    self._tokens(f"{name}.multiway.{m}", module, x, output, select=indices == m)

        return hook

    # -- results -------------------------------------------------------------

    def _is_distributed(self) -> bool:
        if self._distributed is False:
            return False
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self._distributed and not on:
            raise RuntimeError("distributed=True, but torch.distributed is not initialised with several ranks")
        return on

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the statistics file (SPEC §4) to ``path``, atomically.

        Under ``torch.distributed`` every rank must call it: the ranks' exact
        partial states are gathered onto rank 0, which writes the combined file
        (the other ranks write nothing)."""
        if not self._is_distributed():
            self.recorder.save(os.fspath(path))
            return
        import torch.distributed as dist

        with tempfile.TemporaryDirectory(prefix="flatmerge-rank-") as tmp:
            part = os.path.join(tmp, "rank.part")
            self.recorder.save_part(part)
            with open(part, "rb") as f:
                data = f.read()
            rank, world = dist.get_rank(), dist.get_world_size()
            gathered: Optional[List[Any]] = [None] * world if rank == 0 else None
            dist.gather_object(data, gathered, dst=0)
            if rank == 0:
                assert gathered is not None
                paths = []
                for r, blob in enumerate(gathered):
                    p = os.path.join(tmp, f"rank{r}.part")
                    with open(p, "wb") as f:
                        f.write(blob)
                    paths.append(p)
                _stats.combine(paths, path)
        dist.barrier()

    def save_part(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes this process's exact partial state, for :func:`flatmerge.stats.combine`."""
        self.recorder.save_part(os.fspath(path))
