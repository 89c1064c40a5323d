"""What makes a model-level fuse one transaction: checks before the first change, exact
rollback after a failure, Ctrl-C held while a layer is half done.

Used by the in-memory fuse (:mod:`safemerge.model.in_memory`), the streaming fuse
(:mod:`safemerge.model.streaming`) and the PEFT drop-in (:mod:`safemerge.peft`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from safemerge.errors import AdapterConfigError, ModelFuseError
from safemerge.layer import unfuse
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.layer_check import BoundCheck
from safemerge.merge.record import FuseRecord
from safemerge.quant.quantized import QuantizedFuseRecord

PROBLEM_CAP = 20


def tensor_owners(module: nn.Module) -> dict[int, list[str]]:
    """Names of every parameter and buffer, by the address of the storage they use."""
    owners: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]
    for name, tensor in named:
        if tensor.device.type != "meta" and tensor.numel() > 0:
            owners.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    return owners


def shared_weight(layer: nn.Module, name: str, owners: Mapping[int, list[str]]) -> str | None:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return None
    if weight.numel() == 0:
        return None
    sharing = owners.get(weight.untyped_storage().data_ptr(), [])
    if len(sharing) > 1:
        shown = ", ".join(repr(other) for other in sharing[:4])
        return (
            f"its weight is shared by {len(sharing)} parameters ({shown}; tied weights): "
            f"fusing would change them all; untie them first (clone the weight)"
        )
    return None


def roll_back(
    layers: Mapping[str, tuple[nn.Module, list[tuple[LoraAdapter, float]]]],
    records: Mapping[str, FuseRecord | QuantizedFuseRecord],
    *,
    failed: str,
    error: BaseException,
) -> list[str]:
    """Unfuse every fused layer exactly, newest first; interrupts wait until it is done."""
    restored: list[str] = []
    with interrupts_deferred():
        for name in reversed(list(records)):
            try:
                unfuse(layers[name][0], records[name], exact=True)
            except Exception as restore_error:
                left = [other for other in records if other not in restored]
                raise ModelFuseError(
                    f"fusing layer {failed!r} failed ({type(error).__name__}: {error}), and "
                    f"restoring layer {name!r} then failed too ({restore_error}): layers "
                    f"{left} may hold fused weights. Reload the model",
                    problems=[(failed, str(error)), (name, str(restore_error))],
                    rolled_back=restored,
                ) from restore_error
            restored.append(name)
    return restored


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) until the block ends, then raise KeyboardInterrupt once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def plan_error(
    problems: Sequence[tuple[str, str]], path: Path | None, unchanged: str
) -> ModelFuseError:
    shown = "\n".join(f"  {layer}: {what}" for layer, what in problems[:PROBLEM_CAP])
    more = len(problems) - PROBLEM_CAP
    tail = f"\n  ... and {more} more" if more > 0 else ""
    where = f" of {path}" if path is not None else ""
    return ModelFuseError(
        f"refusing to fuse: {len(problems)} layer(s){where} cannot be fused as asked; "
        f"{unchanged}:\n{shown}{tail}\nCheck that the adapters were trained for this "
        f"model, or leave out the layers named",
        problems=problems,
        path=path,
    )


def checked_against_bound(
    check: BoundCheck | None, record: FuseRecord, name: str, fused: torch.Tensor | None = None
) -> float:
    """The fused weight's worst ratio to its bound (``fused``, or the layer's own weight
    fused in place); a ModelFuseError when it exceeds 1."""
    assert check is not None
    worst = check.worst(record.coefficients, fused)
    if not worst <= 1.0:
        raise _bound_error(name, worst)
    return worst


def _bound_error(name: str, worst: float) -> ModelFuseError:
    return ModelFuseError(
        f"layer {name!r}: the fused weight is {worst:.3g} times its error bound away from "
        f"the exact merge somewhere; the fuse is wrong (a bug, or memory corruption). "
        f"Please report it",
        problems=[(name, f"error {worst:.3g} of its bound")],
    )


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise AdapterConfigError(f"scale must be finite; got scale={scale}")


def finite_weight(weight: Any, position: int) -> float:
    value = float(weight)
    if not math.isfinite(value):
        raise AdapterConfigError(f"the weight of adapters[{position}] must be finite; got {weight}")
    return value
