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

With ``reduce_on_device=True`` the values are instead summed where they
are (see :class:`Recording`) and only the sums travel: the recorder adds
the same integers either way, so the file is the host path's, byte for
byte.

Exactness of the device reduction. The recorder sums each value ``v`` as
the integer ``q = trunc(v · 2^60)`` (core/src/recorder.rs). Here ``v``'s
f32 bits are split into its integer significand ``m`` and exponent, and
``q``'s four 32-bit limbs are cut out of ``m`` by integer shifts; int64
tensors then sum the limbs of up to 2^31 tokens exactly, in any order, on
any device (no floating-point arithmetic is involved). The Gram of one
example is the recorder's: ``Σ_rows x xᵀ`` in f64, each entry summed over
the example's tokens in order. A product of two f32 values is exact in
f64, so every step ``G ← G + x_t x_tᵀ`` is one correctly rounded IEEE
addition, the same on a GPU as on the host (fused or not); each entry is
then truncated to ``trunc(g · 2^50)`` as limbs and the examples' limbs are
summed on the device until :meth:`Recording.save` (or :meth:`close`).
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

__all__ = ["Recording", "MODALITIES", "DEFAULT_UNMASKED", "SHARED_INPUTS"]

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


# The recorder's fixed point (core/src/recorder.rs): means at 2^60, Grams
# at 2^50, transported as 32-bit limbs in int64 (flatmerge::recorder::limbs).
_MEAN_SHIFT = 60
_GRAM_SHIFT = 50
_LIMB_BITS = 32
_LIMBS = 4
_LIMB_MASK = (1 << _LIMB_BITS) - 1
# The recorder's range: |v| ≤ 2^60, a Gram diagonal entry ≤ 2^76.
_MAX_ABS = float(2**60)
_GRAM_MAX = float(2**76)
# int64 limbs of at most 2^32 sum 2^31 terms without overflow: a Gram
# accumulator is handed to the recorder before that many examples.
_GRAM_FLUSH = 1 << 30
# Elements per step of the reductions (bounds their temporaries: about ten
# int64 tensors of this many elements).
_CHUNK = 1 << 22


def _limbs(mantissa: torch.Tensor, shift: torch.Tensor) -> List[torch.Tensor]:
    """The four 32-bit limbs of ``trunc(mantissa · 2^shift)`` (int64,
    ``mantissa ≥ 0`` below 2^53), by integer shifts only."""
    one = torch.ones_like(mantissa)
    out = []
    for k in range(_LIMBS):
        t = shift - _LIMB_BITS * k
        # t ≥ 0: the significand's low 32 − t bits land in this limb.
        up = t.clamp(0, _LIMB_BITS - 1)
        left = (mantissa & ((one << (_LIMB_BITS - up)) - 1)) << up
        # t < 0: the bits from position −t on land here (truncation).
        right = (mantissa >> (-t).clamp(0, 63)) & _LIMB_MASK
        limb = torch.where(t >= 0, left, right)
        out.append(torch.where(t >= _LIMB_BITS, torch.zeros_like(limb), limb))
    return out


def _f32_parts(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``v`` (float32) as (negative, m, e) with ``|v| = m · 2^e``, int64."""
    bits = v.contiguous().view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    normal = exponent != 0
    mantissa = torch.where(normal, mantissa | 0x800000, mantissa)
    return bits < 0, mantissa, torch.where(normal, exponent - 150, torch.full_like(exponent, -149))


def _f64_parts(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``v`` (float64) as (negative, m, e) with ``|v| = m · 2^e``, int64."""
    bits = v.contiguous().view(torch.int64)
    exponent = (bits >> 52) & 0x7FF
    mantissa = bits & ((1 << 52) - 1)
    normal = exponent != 0
    mantissa = torch.where(normal, mantissa | (1 << 52), mantissa)
    return bits < 0, mantissa, torch.where(normal, exponent - 1075, torch.full_like(exponent, -1074))


def _check_dtype(t: torch.Tensor, layer: str, which: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _flatmerge.InvalidInputError(
            f"`{layer}`: {which} has dtype {t.dtype}; flatmerge records float32, float16 and bfloat16 activations"
        )


def _moment_limbs(v: torch.Tensor, keep: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per example, the limb sums of the kept tokens' fixed-point values:
    ``v`` ``[B, T, w]`` → int64 ``[B, 2, 4, w]`` (``[:, 0]`` over the
    non-negative values, ``[:, 1]`` over the negative ones' magnitudes), and
    a ``[B]`` bool: the example has a value the recorder refuses (NaN, ±∞,
    beyond 2^60), which the host path then reports."""
    B, T, w = v.shape
    out = torch.zeros((B, 2, _LIMBS, w), dtype=torch.int64, device=v.device)
    bad = torch.zeros(B, dtype=torch.bool, device=v.device)
    step = max(1, _CHUNK // max(1, B * w))
    for t0 in range(0, T, step):
        part = v[:, t0 : t0 + step].float()
        refused = ~torch.isfinite(part) | (part.abs() > _MAX_ABS)
        negative, mantissa, exponent = _f32_parts(part)
        if keep is not None:
            k = keep[:, t0 : t0 + step, None]
            refused &= k
            mantissa = torch.where(k, mantissa, torch.zeros_like(mantissa))
        bad |= refused.flatten(1).any(1)
        for i, limb in enumerate(_limbs(mantissa, exponent + _MEAN_SHIFT)):
            zero = torch.zeros_like(limb)
            out[:, 0, i] += torch.where(negative, zero, limb).sum(1)
            out[:, 1, i] += torch.where(negative, limb, zero).sum(1)
    return out, bad


def _gram_limbs(x: torch.Tensor, keep: Optional[torch.Tensor], examples: List[int]) -> Tuple[torch.Tensor, List[int]]:
    """The signed limb sums ``[4, w (w + 1) / 2]`` over ``examples`` (indices
    into ``x`` ``[B, T, w]``) of each example's f64 Gram of its kept tokens,
    summed in token order and truncated to 2^50, over the packed upper
    triangle; and the examples whose Gram the recorder refuses (a diagonal
    entry beyond 2^76)."""
    B, T, w = x.shape
    rows, cols = torch.triu_indices(w, w, device=x.device)
    flat = rows * w + cols
    acc = torch.zeros((_LIMBS, flat.numel()), dtype=torch.int64, device=x.device)
    refused: List[int] = []
    # Examples per step: the f64 Grams in flight stay near _CHUNK elements.
    step = max(1, _CHUNK // (w * w))
    for e0 in range(0, len(examples), step):
        chosen = torch.tensor(examples[e0 : e0 + step], device=x.device)
        xs = x.index_select(0, chosen).to(torch.float64)
        if keep is not None:
            k = keep.index_select(0, chosen)
            xs = torch.where(k[:, :, None], xs, torch.zeros_like(xs))
            positions = k.any(0).nonzero().flatten().tolist()
        else:
            positions = range(T)
        g = torch.zeros((xs.shape[0], w, w), dtype=torch.float64, device=x.device)
        for t in positions:
            # The product of two f32 values is exact in f64, so this is one
            # rounding per entry and token (fused or not), in token order:
            # the recorder's XᵀX. A masked token adds zeros: no change.
            row = xs[:, t]
            g.addcmul_(row[:, :, None], row[:, None, :])
        too_large = (g.diagonal(dim1=1, dim2=2) > _GRAM_MAX).any(1)
        refused += [examples[e0 + i] for i in too_large.nonzero().flatten().tolist()]
        tri = g.reshape(g.shape[0], w * w).index_select(1, flat)
        del g
        negative, mantissa, exponent = _f64_parts(tri)
        for i, limb in enumerate(_limbs(mantissa, exponent + _GRAM_SHIFT)):
            acc[i] += torch.where(negative, -limb, limb).sum(0)
    return acc, refused


class _Batch:
    """What the hooks need to know about the batch in flight."""

    def __init__(self, mask: Optional[torch.Tensor], ids: Optional[List[int]], modality: List[int], size: Optional[int]):
        self.mask = mask  # bool [B, T] on the host, or None
        self.ids = ids  # example ids, or None until the size is known
        self.modality = modality  # per example, or one value for all
        self.size = size
        self.modality_indices: Optional[torch.Tensor] = None
        self.device_masks: Dict[torch.device, torch.Tensor] = {}
        # Per shared-Gram group: the input seen last and which of the
        # group's modules have read it.
        self.shared: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor], set]] = {}

    def mask_on(self, device: torch.device) -> torch.Tensor:
        # One copy of the mask per device the model is spread over.
        assert self.mask is not None
        m = self.device_masks.get(device)
        if m is None:
            m = self.device_masks[device] = self.mask.to(device)
        return m


#: Sibling modules that read one input, by their last name component: the
#: first present of each group owns the Gram (LLaMA-family attention and
#: MLP; CLIP/SigLIP attention in vision towers).
SHARED_INPUTS: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _copies(module: nn.Module) -> Optional[nn.ModuleList]:
    copies = getattr(module, "multiway", None)
    if isinstance(copies, nn.ModuleList) and len(copies) > 0 and all(isinstance(c, nn.Linear) for c in copies):
        return copies
    return None


def _widths(module: nn.Module, multiway: bool) -> Tuple[Any, ...]:
    if multiway:
        return ("multiway",) + tuple(c.in_features for c in module.multiway)
    return ("linear", module.in_features)


def _layer_names(name: str, module: nn.Module, multiway: bool) -> List[str]:
    if multiway:
        return [f"{name}.multiway.{m}" for m in range(len(module.multiway))]
    return [name]


def _share_by_name(targets: List[Tuple[str, nn.Module, bool]]) -> Dict[str, str]:
    """Module alias → owner module for siblings of :data:`SHARED_INPUTS` of
    the same kind and widths (a plain q_proj cannot own the multiway copies
    of k_proj: each copy reads only its routed tokens)."""
    by_name = {name: (module, multiway) for name, module, multiway in targets}
    out: Dict[str, str] = {}
    parents = sorted({name.rpartition(".")[0] for name in by_name})
    for parent in parents:
        prefix = parent + "." if parent else ""
        for group in SHARED_INPUTS:
            owners: List[str] = []
            for leaf in group:
                name = prefix + leaf
                if name not in by_name:
                    continue
                module, multiway = by_name[name]
                owner = next((o for o in owners if _widths(*by_name[o]) == _widths(module, multiway)), None)
                if owner is None:
                    owners.append(name)
                else:
                    out[name] = owner
    return out


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

    ``share_grams`` (with ``gram``): layers that read one input have one
    Gram. ``True`` (default): the siblings of :data:`SHARED_INPUTS` under one
    parent (``k_proj``/``v_proj`` share ``q_proj``'s, ``up_proj``
    ``gate_proj``'s; multiway copies share copy by copy) when they have the
    same kind and widths; a mapping ``{alias: owner}`` of layer names says
    it explicitly; ``False`` stores every layer's own. The file stores the
    owner's ``x_gram`` once and names the aliases in its ``gram_shared``
    metadata (SPEC §4), which readers resolve; the recorder holds one
    accumulator per owner. Every batch checks that the modules of a group
    were called with the same input (the same tensor, or equal values),
    and raises naming both otherwise (for example k/v of a cross-attention).

    ``reduce_on_device``: sum the activations on the device they are on and
    push only the sums (:meth:`flatmerge.Recorder.push_moments`): per layer
    and batch, ``64·B·(in + out)`` bytes travel instead of the activations.
    The sums are the recorder's exact integers (module docs), so the file is
    byte-identical to the host path's, bf16, f16, padding, rows and Grams
    included. With ``gram`` each example's f64 Gram is built on the device,
    one token at a time in token order (that order is what makes it the
    host's bit for bit), and the layer's limb sums stay on the device until
    :meth:`save`, :meth:`close` or :meth:`flush`: ``32·in(in+1)/2`` bytes
    per stored Gram (twice the host accumulator) plus up to about 100 MB of
    temporaries per layer call. A value the recorder refuses (NaN, ±∞,
    beyond its range) sends that layer's batch through the host path, which
    raises the host path's error.
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
        share_grams: Union[bool, Dict[str, str]] = True,
        reduce_on_device: bool = False,
    ) -> None:
        self.model = model
        self._choose = _matcher(modules)
        self._targets = self._find_targets()
        layers = {n for name, module, multiway in self._targets for n in _layer_names(name, module, multiway)}
        self._gram = bool(gram)
        self._gram_shared, self._share_modules = self._sharing(share_grams, layers) if gram else ({}, {})
        # Owner module → the modules of its group (the owner included).
        self._share_groups: Dict[str, set] = {}
        for alias, owner in self._share_modules.items():
            self._share_groups.setdefault(owner, {owner}).add(alias)
        self._reduce = bool(reduce_on_device)
        # Device limb sums of the Grams not yet given to the recorder:
        # layer → (sums [4, in(in+1)/2], examples summed).
        self._gram_acc: Dict[str, Tuple[torch.Tensor, int]] = {}
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
            gram_shared=self._gram_shared or None,
            sources=[source] if source is not None else None,
        )
        self._distributed = distributed
        self._handles: List[Any] = []
        self._batch: Optional[_Batch] = None
        self._explicit: Optional[Dict[str, Any]] = None
        self._next_local = 0
        self._signature = None
        try:
            self._signature = _inspect.signature(model.forward)
        except (TypeError, ValueError):
            pass

    @property
    def gram_shared(self) -> Dict[str, str]:
        """The layers that share another layer's Gram: alias → owner (the
        file's ``gram_shared``)."""
        return dict(self._gram_shared)

    def _find_targets(self) -> List[Tuple[str, nn.Module, bool]]:
        multiway_children = set()
        targets: List[Tuple[str, nn.Module, bool]] = []
        for name, module in self.model.named_modules():
            copies = _copies(module)
            if copies is not None:
                for c in copies:
                    multiway_children.add(id(c))
                if self._choose(name, module):
                    targets.append((name, module, True))
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and id(module) not in multiway_children and self._choose(name, module):
                targets.append((name, module, False))
        return targets

    def _sharing(self, share: Union[bool, Dict[str, str]], layers: set) -> Tuple[Dict[str, str], Dict[str, str]]:
        """(layer alias → owner, module alias → owner module)."""
        if share is False:
            return {}, {}
        if share is True:
            modules = _share_by_name(self._targets)
            kinds = {name: (module, multiway) for name, module, multiway in self._targets}
            shared: Dict[str, str] = {}
            for alias, owner in modules.items():
                for a, o in zip(_layer_names(alias, *kinds[alias]), _layer_names(owner, *kinds[owner])):
                    shared[a] = o
            return shared, modules
        shared = {str(a): str(o) for a, o in dict(share).items()}
        for alias, owner in shared.items():
            for n in (alias, owner):
                if n not in layers:
                    raise ValueError(f"share_grams: `{n}` is not a recorded layer")
            if owner in shared:
                raise ValueError(f"share_grams: `{alias}` shares the Gram of `{owner}`, which itself shares one")
        strip = lambda n: re.sub(r"\.multiway\.\d+$", "", n)  # noqa: E731
        return shared, {strip(a): strip(o) for a, o in shared.items()}

    # -- hooks ---------------------------------------------------------------

    def __enter__(self) -> "Recording":
        if self._handles:
            raise RuntimeError("this Recording is already open")
        targets = self._targets
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
        """Removes the hooks (the recorded statistics stay) and hands the
        device's Gram sums to the recorder (:meth:`flush`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batch = None
        self.flush()

    def flush(self) -> None:
        """Hands the Gram sums held on devices (``reduce_on_device``) to
        :attr:`recorder`, freeing their device memory; :meth:`save` and
        :meth:`close` call it. Needed only to use :attr:`recorder` directly."""
        while self._gram_acc:
            layer, (sums, _) = self._gram_acc.popitem()
            self.recorder.add_gram_sums(layer, sums.to("cpu").numpy())

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

    def _push_reduced(
        self, layer: str, x: torch.Tensor, y: torch.Tensor, keep: Optional[torch.Tensor], batch: _Batch
    ) -> None:
        """Pushes ``x`` ``[B, T, in]`` and ``y`` ``[B, T, out]`` (tokens kept
        by ``keep``) as per-example sums reduced on their devices."""
        _check_dtype(x, layer, "the input")
        _check_dtype(y, layer, "the output")
        B, T = x.shape[0], x.shape[1]
        counts = [int(c) for c in keep.sum(dim=1).tolist()] if keep is not None else [T] * B
        xs, x_bad = _moment_limbs(x, keep)
        ys, y_bad = _moment_limbs(y, None if keep is None else keep.to(y.device))
        examples = [b for b in range(B) if counts[b]]
        gram: Optional[torch.Tensor] = None
        refused: List[int] = []
        if self._gram and layer not in self._gram_shared and examples:
            gram, refused = _gram_limbs(x, keep, examples)
        if refused or bool(x_bad.any()) or bool(y_bad.any()):
            # Nothing of this call is pushed yet: the host path pushes in
            # order and raises at the first refused value, naming it.
            if keep is None:
                self._push_tokens(layer, x.reshape(B * T, -1), y.reshape(B * T, -1), batch, counts)
            else:
                self._push_tokens(layer, x[keep], y[keep.to(y.device)], batch, counts)
            return
        hx, hy = xs.to("cpu").numpy(), ys.to("cpu").numpy()
        assert batch.ids is not None
        for b in examples:
            self.recorder.push_moments(layer, counts[b], hx[b], hy[b], batch.ids[b], batch.modality[b])
        if gram is not None:
            sums, n = self._gram_acc.pop(layer, (None, 0))
            if sums is not None and sums.device != gram.device:
                self.recorder.add_gram_sums(layer, sums.to("cpu").numpy())
                sums, n = None, 0
            sums = gram if sums is None else sums + gram
            n += len(examples)
            if n >= _GRAM_FLUSH:
                self.recorder.add_gram_sums(layer, sums.to("cpu").numpy())
            else:
                self._gram_acc[layer] = (sums, n)

    def _check_shared(self, name: str, x: torch.Tensor, indices: Optional[torch.Tensor]) -> None:
        """Checks that the modules sharing a Gram read one input in this
        batch (``share_grams``)."""
        group = self._share_modules.get(name, name)
        batch = self._batch
        if group not in self._share_groups or batch is None:
            return
        seen = batch.shared.get(group)
        if seen is None or name in seen[2]:
            # The group's first module of this call (a repeated call inside
            # one Recording.batch context starts a new round).
            batch.shared[group] = (x, indices, {name})
            return
        first, first_indices, members = seen

        def same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
            if a is b:
                return True
            if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                return False
            return bool(torch.equal(a, b.to(a.device)))

        if not (same(first, x) and same(first_indices, indices)):
            other = sorted(members)[0]
            raise ValueError(
                f"`{name}` and `{other}` share one Gram (share_grams), but were called with different inputs: "
                "pass share_grams=False, or a mapping of the layers that do read one input"
            )
        members.add(name)
        if members == self._share_groups[group]:
            # Every module of the group has read it: let the input go (held
            # to the end of the forward call, it would keep every layer's
            # activations alive).
            del batch.shared[group]

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
        if self._reduce:
            self._push_reduced(layer, x, y, keep, batch)
            return
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
                self._check_shared(layer, x, None)

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
                self._check_shared(name, x, indices)

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
        self.flush()
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
        self.flush()
        self.recorder.save_part(os.fspath(path))
