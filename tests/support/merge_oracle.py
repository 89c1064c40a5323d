"""Hypothesis strategies for safemerge's property tests: layers, adapters, adversarial cases.

A drawn case is a handful of integers and floats (shapes, seeds, magnitudes, and the few
values that matter); its tensors are made from the seeds with ``torch.Generator``, which
is fast. What a property hinges on (where a NaN is planted, which weight sits at the
overflow boundary, the scale) is drawn by Hypothesis itself, so a shrunk failure reads
as a small, concrete case.

Layouts follow PEFT: ``lora_A`` is ``(rank, in, *kernel)``, ``lora_B`` is
``(out, rank, 1, ...)``. For an Embedding ``in`` is the number of embeddings and ``out``
the embedding size; for a GPT-2 style Conv1D the weight is stored ``(in, out)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st
from torch import nn

import safemerge as sm

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, *FLOAT8)
NARROW_DTYPES = (torch.float16, torch.bfloat16, *FLOAT8)
KINDS = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "fan_in_fan_out")
F32_MAX = float(torch.finfo(torch.float32).max)
F16_MAX = float(torch.finfo(torch.float16).max)

NAN, INF = math.nan, math.inf
#: The non-finite values planted into adapters (and, rarely, into weights).
PLANTED_VALUES = (NAN, INF, -INF)

#: Block sizes (bytes of float32 work per row block) to run the engine with, so that these
#: small tensors also go through the multi-block paths (a partial last block, corrections
#: spanning blocks). ``None`` keeps the library's default (one block at these sizes).
BLOCK_BYTES = (None, None, 160, 512, 4096)

#: Ordinary and extreme overall scales: zero of both signs, negative, tiny, huge.
#: 1e-38 puts ``scale * B`` among float32's subnormals, where a rounding is no longer relative.
SPECIAL_SCALES = (1.0, 0.0, -0.0, -1.0, 0.5, 2.0, 1 / 3, 1e-6, 1e6)
SPECIAL_SCALES += (1e-30, -1e-30, 1e30, -1e30, 1e-38, -1e-38)


class TransposedLinear(nn.Module):
    """GPT-2's ``Conv1D``: a matmul layer that stores its weight as ``(in, out)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


def dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def representable(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (saturating at its range), back as a Python float."""
    bounded = max(-dtype_max(dtype), min(dtype_max(dtype), value))
    return float(torch.tensor(bounded, dtype=torch.float32).to(dtype).to(torch.float64))


def _filled(
    shape: tuple[int, ...], std: float, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    values = torch.randn(shape, generator=generator) * std
    if dtype != torch.float32:
        values = values.clamp(-dtype_max(dtype), dtype_max(dtype))
    return values.to(dtype)


def _assign(tensor: torch.Tensor, sets: tuple[tuple[int, float], ...]) -> None:
    flat = tensor.view(-1)
    for index, value in sets:
        flat[index] = value


@dataclass(frozen=True)
class LayerSpec:
    """One layer to build: kind, sizes, dtype, and how its weight is filled."""

    kind: str
    out_features: int
    in_features: int
    kernel: tuple[int, ...]
    dtype: torch.dtype
    has_bias: bool
    seed: int
    weight_std: float
    bias_std: float = 1.0
    #: ``(flat index, value)`` written into the weight after it is filled (in its dtype).
    weight_sets: tuple[tuple[int, float], ...] = ()
    #: Store the weight non-contiguously (dims 0 and 1 swapped in memory, values the same).
    strided: bool = False

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(in, out)`` (delta is ``(B @ A).T``)."""
        return self.kind in ("embedding", "fan_in_fan_out")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The weight as a matrix whose row-major order is the weight's."""
        shape = self.weight_shape
        return shape[0], math.prod(shape[1:])

    @property
    def bias_dtype(self) -> torch.dtype:
        # float8 layers keep a float32 bias (float8 biases are not a thing in practice).
        return torch.float32 if self.dtype in FLOAT8 else self.dtype

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.in_features, *self.kernel)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank, *(1,) * len(self.kernel))

    def weight_index(self, out_index: int, in_column: int) -> int:
        """Flat weight index where ``B[out_index, :] @ A[:, in_column]`` lands.

        ``in_column`` indexes ``lora_A`` flattened to ``(rank, in * prod(kernel))``.
        """
        _, columns = self.matrix_shape
        if self.transposed:
            return in_column * columns + out_index
        return out_index * columns + in_column

    def build(self) -> nn.Module:
        generator = torch.Generator().manual_seed(self.seed)
        if self.kind == "linear":
            layer: nn.Module = nn.Linear(self.in_features, self.out_features, bias=self.has_bias)
        elif self.kind == "embedding":
            layer = nn.Embedding(self.in_features, self.out_features)
        elif self.kind == "fan_in_fan_out":
            layer = TransposedLinear(self.in_features, self.out_features, self.has_bias)
        else:
            conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.kind]
            layer = conv(self.in_features, self.out_features, self.kernel, bias=self.has_bias)
        with torch.no_grad():
            weight = _filled(self.weight_shape, self.weight_std, self.dtype, generator)
            _assign(weight, self.weight_sets)
            if self.strided:
                weight = weight.transpose(0, 1).contiguous().transpose(0, 1)
            # Replacing .data keeps the Parameter object (the way to get a float8 layer).
            layer.weight.data = weight
            if self.has_bias:
                layer.bias.data = _filled(
                    (self.out_features,), self.bias_std, self.bias_dtype, generator
                )
        return layer


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter to build for a :class:`LayerSpec`."""

    rank: int
    seed: int
    a_std: float
    b_std: float
    dtype: torch.dtype = torch.float32
    alpha: float | None = None
    use_rslora: bool = False
    weight: float = 1.0
    with_lora_bias: bool = False
    lora_bias_std: float = 1.0
    magnitude_std: float | None = None
    #: Second half of the rank repeats the first with A negated: ``B @ A`` cancels exactly.
    mirrored: bool = False
    #: ``(tensor name, flat index, value)`` written last: "lora_A", "lora_B", "lora_bias".
    sets: tuple[tuple[str, int, float], ...] = ()

    @property
    def lora_scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), computed here independently."""
        alpha = float(self.rank) if self.alpha is None else float(self.alpha)
        return alpha / math.sqrt(self.rank) if self.use_rslora else alpha / self.rank

    def build(self, layer: LayerSpec) -> sm.LoraAdapter:
        generator = torch.Generator().manual_seed(self.seed)
        lora_A = _filled(layer.a_shape(self.rank), self.a_std, self.dtype, generator)
        lora_B = _filled(layer.b_shape(self.rank), self.b_std, self.dtype, generator)
        if self.mirrored:
            half = self.rank // 2
            lora_A[half : 2 * half] = -lora_A[:half]
            lora_B[:, half : 2 * half] = lora_B[:, :half]
        lora_bias = None
        if self.with_lora_bias:
            lora_bias = _filled((layer.out_features,), self.lora_bias_std, self.dtype, generator)
        magnitude = None
        if self.magnitude_std is not None:
            magnitude = (
                torch.rand(layer.out_features, generator=generator) + 0.25
            ) * self.magnitude_std
        tensors = {"lora_A": lora_A, "lora_B": lora_B, "lora_bias": lora_bias}
        for name, index, value in self.sets:
            tensor = tensors[name]
            assert tensor is not None, f"{name} is set but not built"
            tensor.view(-1)[index] = value
        return sm.LoraAdapter(
            lora_A,
            lora_B,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
            lora_bias=lora_bias,
            magnitude=magnitude,
            fan_in_fan_out=layer.kind == "fan_in_fan_out",
        )


@dataclass(frozen=True)
class MergeCase:
    """A layer, the adapters to fuse into it with their weights, and the overall scale."""

    layer: LayerSpec
    adapters: tuple[AdapterSpec, ...]
    scale: float
    category: str = "general"
    block_bytes: int | None = None
    #: Passed to ``fuse``: without the correction the fuse cannot work in place (a copy path).
    exact_unfuse: bool = True

    @property
    def coefficients(self) -> tuple[float, ...]:
        """What multiplies each ``B @ A``: ``weight * lora_scale * scale`` (the documented order)."""
        return tuple(spec.weight * spec.lora_scale * self.scale for spec in self.adapters)

    @property
    def is_dora(self) -> bool:
        return any(spec.magnitude_std is not None for spec in self.adapters)

    def build(self) -> tuple[nn.Module, list[tuple[sm.LoraAdapter, float]]]:
        layer = self.layer.build()
        return layer, [(spec.build(self.layer), spec.weight) for spec in self.adapters]


# --- building blocks -----------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


def dims() -> st.SearchStrategy[int]:
    """Sizes up to 40, favouring 1 and sizes that no block or packing width divides."""
    return st.one_of(st.sampled_from((1, 2, 3, 5, 7, 13, 17, 33, 40)), st.integers(1, 40))


def ranks(smallest_dim: int) -> st.SearchStrategy[int]:
    """Rank 1, small ranks, and ranks above ``min(out, in)`` (a rank-deficient product)."""
    return st.one_of(
        st.just(1),
        st.integers(1, 4),
        st.integers(smallest_dim + 1, smallest_dim + 8),
        st.integers(1, 40),
    )


def scales(*, extreme: bool = True) -> st.SearchStrategy[float]:
    """Overall scales: 0, -0, negative, tiny (1e-30), huge (1e30) and ordinary values."""
    parts = [st.sampled_from(SPECIAL_SCALES), st.floats(-10, 10, allow_nan=False)]
    if extreme:
        parts.append(st.floats(-1e36, 1e36, allow_nan=False, allow_infinity=False))
    return st.one_of(*parts)


def adapter_weights() -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from((1.0, 0.5, -1.0, 0.0, 0.7, 0.3)), st.floats(-2, 2, allow_nan=False)
    )


_WEIGHT_STDS = {
    torch.float32: (0.0, 1e-3, 0.02, 1.0, 50.0),
    torch.float16: (0.0, 1e-3, 0.02, 1.0, 50.0),
    torch.bfloat16: (0.0, 1e-3, 0.02, 1.0, 50.0),
    torch.float8_e4m3fn: (0.0, 0.05, 1.0, 30.0),
    torch.float8_e5m2: (0.0, 0.05, 1.0, 300.0),
}


def special_values(dtype: torch.dtype) -> tuple[float, ...]:
    """Values of ``dtype`` that stress the bit-exact restore: signed zeros, extremes, subnormals."""
    info = torch.finfo(dtype)
    tiny_subnormal = float(info.smallest_normal) * float(info.eps)
    return (
        -0.0,
        0.0,
        info.max,
        -info.max,
        float(info.smallest_normal),
        tiny_subnormal,
        -tiny_subnormal,
    )


@st.composite
def layer_specs(
    draw: st.DrawFn,
    *,
    dtypes: tuple[torch.dtype, ...] = WEIGHT_DTYPES,
    kinds: tuple[str, ...] = KINDS,
    specials: bool = True,
) -> LayerSpec:
    """Layers of every kind, dtype and odd size; optionally with special weight values."""
    kind = draw(st.sampled_from(kinds))
    if kind.startswith("conv"):
        spatial = int(kind[4])
        channels = st.integers(1, {1: 12, 2: 8, 3: 4}[spatial])
        out_features, in_features = draw(channels), draw(channels)
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
    else:
        out_features, in_features, kernel = draw(dims()), draw(dims()), ()
    dtype = draw(st.sampled_from(dtypes))
    has_bias = kind != "embedding" and draw(st.booleans())
    spec = LayerSpec(
        kind=kind,
        out_features=out_features,
        in_features=in_features,
        kernel=kernel,
        dtype=dtype,
        has_bias=has_bias,
        seed=draw(seeds),
        weight_std=draw(st.sampled_from(_WEIGHT_STDS[dtype])),
        bias_std=draw(st.sampled_from((0.0, 0.1, 1.0))),
        strided=draw(st.integers(0, 4)) == 0,
    )
    if specials and draw(st.booleans()):
        positions = st.integers(0, spec.weight_numel - 1)
        sets = draw(
            st.lists(st.tuples(positions, st.sampled_from(special_values(dtype))), max_size=4)
        )
        if draw(st.integers(0, 7)) == 0:
            # A weight that is already non-finite: every fuse must refuse, and put it back.
            # (float8_e4m3fn has no Inf: writing one saturates, NaN it does have.)
            sets.append((draw(positions), draw(st.sampled_from(PLANTED_VALUES))))
        spec = replace(spec, weight_sets=tuple(sets))
    return spec


@st.composite
def adapter_specs(
    draw: st.DrawFn,
    layer: LayerSpec,
    *,
    dora: bool = False,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float32, torch.float16, torch.bfloat16),
) -> AdapterSpec:
    smallest = min(layer.out_features, layer.in_features)
    rank = draw(ranks(smallest))
    stds = st.sampled_from((0.0, 1e-3, 0.05, 1.0, 4.0))
    return AdapterSpec(
        rank=rank,
        seed=draw(seeds),
        a_std=draw(stds),
        b_std=draw(stds),
        dtype=draw(st.sampled_from(dtypes)),
        alpha=draw(
            st.one_of(st.none(), st.sampled_from((1.0, 8.0, 16.0, 0.5)), st.floats(-64, 64))
        ),
        use_rslora=draw(st.booleans()),
        weight=draw(adapter_weights()),
        with_lora_bias=layer.has_bias and draw(st.booleans()),
        lora_bias_std=draw(st.sampled_from((1e-3, 0.1, 1.0))),
        magnitude_std=draw(st.sampled_from((0.1, 1.0, 30.0))) if dora else None,
    )


@st.composite
def _random_cases(
    draw: st.DrawFn,
    *,
    dtypes: tuple[torch.dtype, ...],
    allow_dora: bool,
    specials: bool,
    scale_strategy: st.SearchStrategy[float] | None,
) -> MergeCase:
    layer = draw(layer_specs(dtypes=dtypes, specials=specials))
    dora = allow_dora and draw(st.integers(0, 4)) == 0
    count = 1 if dora else draw(st.integers(1, 3))
    adapters = tuple(draw(adapter_specs(layer, dora=dora)) for _ in range(count))
    scale = draw(scale_strategy if scale_strategy is not None else scales())
    return MergeCase(
        layer, adapters, scale, "dora" if dora else "general", draw(st.sampled_from(BLOCK_BYTES))
    )


#: Tiny overall scales: ``scale * B`` lands among float32's subnormals (below 1.2e-38).
TINY_SCALES = (1e-30, -1e-30, 1e-38, 1e-40, 1e-45)


@st.composite
def tiny_scale_cases(
    draw: st.DrawFn, *, dtypes: tuple[torch.dtype, ...] = WEIGHT_DTYPES
) -> MergeCase:
    """Tiny scales on small B and large A, often into zero weights: where float32 stops
    rounding relatively (subnormal ``scale * B``) and nothing in ``W`` hides the error."""
    layer = draw(layer_specs(dtypes=dtypes, specials=True))
    layer = replace(layer, weight_std=draw(st.sampled_from((0.0, 0.0, 1e-3, 1.0))))
    count = draw(st.integers(1, 2))
    adapters = tuple(
        replace(
            draw(adapter_specs(layer)),
            a_std=draw(st.sampled_from((1.0, 100.0, 1e4))),
            b_std=draw(st.sampled_from((1e-9, 1e-3, 1.0))),
            dtype=torch.float32,
        )
        for _ in range(count)
    )
    scale = draw(st.one_of(st.sampled_from(TINY_SCALES), st.floats(1e-45, 1e-25)))
    return MergeCase(layer, adapters, scale, "tiny-scale", draw(st.sampled_from(BLOCK_BYTES)))


def _either_fuse_path(cases: st.SearchStrategy[MergeCase]) -> st.SearchStrategy[MergeCase]:
    """Cases fused with and without the exact-unfuse correction (in place, or into a copy)."""
    flags = st.sampled_from((True, False))
    return st.tuples(cases, flags).map(lambda pair: replace(pair[0], exact_unfuse=pair[1]))


def general_cases(
    *,
    dtypes: tuple[torch.dtype, ...] = WEIGHT_DTYPES,
    allow_dora: bool = True,
    specials: bool = True,
    scale_strategy: st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[MergeCase]:
    """Random layers with one to three random adapters (or one DoRA adapter); a share of
    them in the tiny-scale regime unless ``scale_strategy`` fixes the scales."""
    random_cases = _random_cases(
        dtypes=dtypes, allow_dora=allow_dora, specials=specials, scale_strategy=scale_strategy
    )
    if scale_strategy is not None:
        return _either_fuse_path(random_cases)
    return _either_fuse_path(
        st.one_of(random_cases, random_cases, random_cases, tiny_scale_cases(dtypes=dtypes))
    )


# --- adversarial cases ------------------------------------------------------------------


@st.composite
def planted_cases(draw: st.DrawFn, value: float) -> MergeCase:
    """``value`` (NaN, +Inf or -Inf) planted in A, B or lora_bias: last, first or any element;
    sometimes with a second non-finite value planted elsewhere."""
    base = draw(general_cases(allow_dora=False, scale_strategy=scales(extreme=False)))
    adapter_index = st.integers(0, len(base.adapters) - 1)
    plants = [(draw(adapter_index), value)]
    plants += draw(st.lists(st.tuples(adapter_index, st.sampled_from(PLANTED_VALUES)), max_size=1))
    adapters = list(base.adapters)
    for which, value in plants:
        spec = adapters[which]
        targets = ["lora_A", "lora_B"] + (["lora_bias"] if base.layer.has_bias else [])
        tensor = draw(st.sampled_from(targets))
        numel = {
            "lora_A": math.prod(base.layer.a_shape(spec.rank)),
            "lora_B": math.prod(base.layer.b_shape(spec.rank)),
            "lora_bias": base.layer.out_features,
        }[tensor]
        position = draw(st.sampled_from(("last", "first", "anywhere")))
        index = {"last": numel - 1, "first": 0}.get(position)
        if index is None:
            index = draw(st.integers(0, numel - 1))
        adapters[which] = replace(
            spec,
            with_lora_bias=spec.with_lora_bias or tensor == "lora_bias",
            sets=(*spec.sets, (tensor, index, value)),
        )
    return replace(base, adapters=tuple(adapters), category="planted")


@st.composite
def fp16_product_cases(draw: st.DrawFn) -> MergeCase:
    """Adapters whose single products ``B[i,k] * A[k,j]`` overflow float16, not float32.

    A merge computed in float16 would see Inf here; in float32 the sum may well fit
    (small scale, or a mirrored adapter whose products cancel exactly).
    """
    layer = draw(
        layer_specs(
            dtypes=(
                torch.float16,
                torch.bfloat16,
                torch.float8_e5m2,
                torch.float32,
                torch.float8_e4m3fn,
            ),
            specials=False,
        )
    )
    mirrored = draw(st.booleans())
    rank = draw(st.integers(1, 4)) * (2 if mirrored else 1)
    big = st.floats(256, 2000).map(lambda v: representable(v, torch.float16))
    sign = st.sampled_from((1.0, -1.0))
    a_value, b_value = draw(big) * draw(sign), draw(big) * draw(sign)
    assert abs(a_value * b_value) > F16_MAX
    sets: tuple[tuple[str, int, float], ...] = (("lora_A", 0, a_value), ("lora_B", 0, b_value))
    if mirrored:
        # Keep the exact cancellation: the mirrored copy of A[0, 0] is row rank/2.
        half_row = math.prod(layer.a_shape(rank)[1:]) * (rank // 2)
        sets = (*sets, ("lora_A", half_row, -a_value), ("lora_B", rank // 2, b_value))
    adapter = AdapterSpec(
        rank=rank,
        seed=draw(seeds),
        a_std=draw(st.sampled_from((1.0, 100.0, 300.0))),
        b_std=draw(st.sampled_from((1.0, 100.0, 300.0))),
        dtype=draw(st.sampled_from((torch.float16, torch.float32))),
        weight=1.0,
        mirrored=mirrored,
        sets=sets,
    )
    scale = draw(
        st.one_of(st.sampled_from((1.0, 2.0**-10, 2.0**-16, 1e-3, 1e-6)), st.floats(1e-7, 1.0))
    )
    return MergeCase(layer, (adapter,), scale, "fp16-product", draw(st.sampled_from(BLOCK_BYTES)))


def tie_above_max(dtype: torch.dtype) -> float:
    """Midpoint between ``dtype``'s largest value and the next step of its grid (independent
    of safemerge.numerics): the round-to-nearest boundary of its range."""
    largest = dtype_max(dtype)
    mantissa_bits = -round(math.log2(float(torch.finfo(dtype).eps)))
    return largest + 2.0 ** (math.floor(math.log2(largest)) - mantissa_bits) / 2


@st.composite
def cast_only_overflow_cases(draw: st.DrawFn) -> MergeCase:
    """One element whose float32 sum is finite but beyond the weight dtype's range.

    The weight holds a large value of its dtype (fp16 ~60000, bf16 ~3e38, ...) and a
    rank-1 delta lands on it pushing the float32 sum past the range: it is the cast back
    that overflows (to Inf, or for float8_e4m3fn silently saturating to 448).
    """
    dtype = draw(st.sampled_from(NARROW_DTYPES))
    layer = draw(layer_specs(dtypes=(dtype,), specials=False))
    layer = replace(layer, weight_std=min(layer.weight_std, 1.0))
    rank = draw(st.integers(1, 3))
    out_index = draw(st.integers(0, layer.out_features - 1))
    in_column = draw(st.integers(0, math.prod(layer.a_shape(1)[1:]) - 1))
    sign = draw(st.sampled_from((1.0, -1.0)))
    weight_value = representable(draw(st.floats(0.5, 1.0)) * dtype_max(dtype), dtype)
    threshold = tie_above_max(dtype)
    ceiling = min(4 * threshold, F32_MAX)
    target = threshold + draw(st.floats(0.05, 0.95)) * (ceiling - threshold)
    delta = target - weight_value
    # alpha = 1 and weight 1: the coefficient is scale / rank. Only scales for which A can
    # hold delta / coefficient in float32 give the intended case.
    feasible = [s for s in (1.0, 0.5, 4.0, 1e30, 1e-3) if abs(delta * rank / s) < F32_MAX / 2]
    scale = draw(st.sampled_from(feasible))
    a_value = sign * delta * rank / scale
    adapter = AdapterSpec(
        rank=rank,
        seed=draw(seeds),
        a_std=draw(st.sampled_from((0.0, 1e-3))),
        b_std=draw(st.sampled_from((0.0, 1e-3))),
        alpha=1.0,
        weight=1.0,
        sets=(("lora_A", in_column, a_value), ("lora_B", out_index * rank, 1.0)),
    )
    layer = replace(
        layer, weight_sets=((layer.weight_index(out_index, in_column), sign * weight_value),)
    )
    return MergeCase(layer, (adapter,), scale, "cast-only", draw(st.sampled_from(BLOCK_BYTES)))


@st.composite
def boundary_cases(draw: st.DrawFn) -> MergeCase:
    """Exactly computable sums (dyadic, few bits) just below, at and just above the range.

    Every float32 step is exact here, so the fused value is the exact sum rounded once:
    at the tie the dtype's own rounding rule decides (Inf for float16/bfloat16/e5m2,
    448 for float8_e4m3fn, whose largest value has an even significand).
    """
    dtype = draw(st.sampled_from(NARROW_DTYPES))
    layer = draw(layer_specs(dtypes=(dtype,), specials=False))
    largest = dtype_max(dtype)
    half_gap = tie_above_max(dtype) - largest
    step = 2 * half_gap
    weight_value = draw(st.sampled_from((largest, largest - step)))
    weight_value = representable(weight_value, dtype)
    fraction = draw(st.sampled_from((0.5, 1 - 1 / 64, 1.0, 1 + 1 / 64, 1.5, 2.0)))
    delta = (largest - weight_value) + fraction * half_gap
    sign = draw(st.sampled_from((1.0, -1.0)))
    scale = 2.0 ** draw(st.integers(-4, 4))
    b_value = 2.0 ** draw(st.integers(-3, 3))
    out_index = draw(st.integers(0, layer.out_features - 1))
    in_column = draw(st.integers(0, math.prod(layer.a_shape(1)[1:]) - 1))
    adapter = AdapterSpec(
        rank=1,
        seed=draw(seeds),
        a_std=0.0,
        b_std=0.0,
        weight=1.0,
        sets=(
            ("lora_A", in_column, sign * delta / (scale * b_value)),
            ("lora_B", out_index, b_value),
        ),
    )
    layer = replace(
        layer, weight_sets=((layer.weight_index(out_index, in_column), sign * weight_value),)
    )
    return MergeCase(layer, (adapter,), scale, "boundary", draw(st.sampled_from(BLOCK_BYTES)))


def adversarial_cases() -> st.SearchStrategy[MergeCase]:
    """Every adversarial family, in roughly equal shares."""
    return _either_fuse_path(
        st.one_of(
            *(planted_cases(value) for value in PLANTED_VALUES),
            fp16_product_cases(),
            cast_only_overflow_cases(),
            boundary_cases(),
        )
    )
