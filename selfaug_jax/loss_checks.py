"""Input validation of :mod:`selfaug_jax.loss` and :mod:`selfaug_jax.fused_loss` (Python-level, at trace time).

Options are checked whenever a loss function is traced; array *values* (label ids in range, a 0/1 attention mask)
only when the arrays are concrete and fully addressable, so nothing here syncs with the device inside ``jax.jit``.
Errors name the function and the offending tensor, index and value. Like ``loss.py`` this module imports only jax,
numpy and the standard library.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100
"""Label value marking a position without a target (Hugging Face / torch ``ignore_index``)."""

DIRECTIONS = ("forward", "reverse", "jsd")
ALIGNS = ("prompt", "prompt_without_padding", "all", "response")
GRAD_MODES = ("precompute", "remat")


def check_options(*, alpha: float, direction: str, beta: float, temperature: float, align: str,
                  include_padding: bool, where: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"{where}: direction={direction!r}; expected one of {DIRECTIONS}")
    if align not in ALIGNS:
        raise ValueError(f"{where}: align={align!r}; expected one of {ALIGNS}")
    if not isinstance(include_padding, (bool, np.bool_)):
        raise TypeError(f"{where}: include_padding must be a bool, got {include_padding!r}")
    for name, value in (("alpha", alpha), ("beta", beta), ("temperature", temperature)):
        if isinstance(value, jax.core.Tracer) or not np.isscalar(value) or not np.isfinite(float(value)):
            raise ValueError(f"{where}: {name} must be a finite Python number (static), got {value!r}")
    if alpha < 0:
        raise ValueError(f"{where}: alpha={alpha} must be >= 0")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}: beta={beta} must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"{where}: temperature={temperature} must be > 0")


def check_fused_options(chunk_size: int, grad_mode: str, *, where: str, skip_unweighted: bool = True) -> None:
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"{where}: grad_mode={grad_mode!r}; expected one of {GRAD_MODES}")
    if not isinstance(skip_unweighted, (bool, np.bool_)):
        raise TypeError(f"{where}: skip_unweighted must be a bool, got {skip_unweighted!r}")


def _is_concrete(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return True
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_fully_addressable


def check_labels(labels_bt: Any, batch_time: tuple[int, int], vocab: int, where: str) -> None:
    if getattr(labels_bt, "ndim", None) != 2:
        raise ValueError(f"{where}: labels_bt must have shape [B, T]; got shape {getattr(labels_bt, 'shape', None)}")
    if tuple(labels_bt.shape) != batch_time:
        raise ValueError(f"{where}: labels_bt shape {tuple(labels_bt.shape)} does not match [B, T] = {batch_time}")
    if not jnp.issubdtype(labels_bt.dtype, jnp.integer):
        raise TypeError(f"{where}: labels_bt must be an integer array, got dtype {labels_bt.dtype}")
    if _is_concrete(labels_bt):
        arr = np.asarray(labels_bt)
        bad = (arr != IGNORE_INDEX) & ((arr < 0) | (arr >= vocab))
        if bad.any():
            b, t = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{where}: labels_bt[{b}, {t}] = {int(arr[b, t])} is neither {IGNORE_INDEX} nor a token "
                             f"id in [0, {vocab}) ({int(bad.sum())} such entries)")


def check_mask(attention_mask_bt: Any, batch_time: tuple[int, int], *, align: str, include_padding: bool,
               where: str) -> None:
    needs_mask = align == "prompt_without_padding" or not include_padding
    if attention_mask_bt is None:
        if needs_mask:
            raise ValueError(f"{where}: align={align!r}, include_padding={include_padding} needs attention_mask_bt "
                             "(1 = real token, 0 = padding), but it is None")
        return
    if tuple(getattr(attention_mask_bt, "shape", ())) != batch_time:
        raise ValueError(f"{where}: attention_mask_bt shape {tuple(getattr(attention_mask_bt, 'shape', ()))} does "
                         f"not match [B, T] = {batch_time}")
    if _is_concrete(attention_mask_bt):
        arr = np.asarray(attention_mask_bt)
        bad = (arr != 0) & (arr != 1)
        if bad.any():
            b, t = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{where}: attention_mask_bt[{b}, {t}] = {arr[b, t]!r}; expected 0 or 1")


def check_logits(logits_btv: Any, name: str, where: str) -> None:
    if getattr(logits_btv, "ndim", None) != 3:
        raise ValueError(f"{where}: {name} must have shape [B, T, V]; got shape {getattr(logits_btv, 'shape', None)}")
    if not jnp.issubdtype(logits_btv.dtype, jnp.floating):
        raise TypeError(f"{where}: {name} must be a floating array, got dtype {logits_btv.dtype}")


def check_logits_pair(logits_btv: Any, ref_logits_btv: Any, labels_bt: Any, attention_mask_bt: Any, *,
                      align: str, include_padding: bool, where: str) -> None:
    """Validate policy / reference logits of the same shape and the labels / mask that go with them."""
    check_logits(logits_btv, "logits_btv", where)
    check_logits(ref_logits_btv, "ref_logits_btv", where)
    if ref_logits_btv.shape != logits_btv.shape:
        raise ValueError(f"{where}: ref_logits_btv shape {ref_logits_btv.shape} != logits_btv shape "
                         f"{logits_btv.shape}")
    batch_time = tuple(logits_btv.shape[:2])
    check_labels(labels_bt, batch_time, logits_btv.shape[2], where)
    check_mask(attention_mask_bt, batch_time, align=align, include_padding=include_padding, where=where)
