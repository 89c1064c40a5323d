"""The guard's decision and the refusal it builds: counts, first index, message."""

from __future__ import annotations

import pytest
import torch

from safemerge import NonFiniteMergeError, SafemergeError
from safemerge.merge.guard import block_fits, check_vector, non_finite_error
from safemerge.merge.numerics import overflow_threshold


def test_block_fits_sees_nan_inf_and_overflow_anywhere() -> None:
    threshold = overflow_threshold(torch.float16)
    block = torch.zeros(3, 5)
    assert block_fits(block, threshold)
    for bad in (float("nan"), float("inf"), -float("inf"), 70000.0, -65520.0):
        for position in ((0, 0), (2, 4), (1, 3)):
            poisoned = block.clone()
            poisoned[position] = bad
            assert not block_fits(poisoned, threshold), (bad, position)
    assert block_fits(torch.full((2,), 65519.0), threshold)  # rounds to 65504
    assert block_fits(torch.empty(0, 4), threshold)


def test_refusal_counts_every_kind_across_blocks() -> None:
    first = torch.tensor([[1.0, float("nan")], [70000.0, 2.0]])
    second = torch.tensor([[float("inf"), -float("inf")], [-1e6, float("nan")]])
    error = non_finite_error(
        [first, second], layer="q_proj", tensor="weight", dtype=torch.float16, shape=(4, 2)
    )
    assert isinstance(error, NonFiniteMergeError)
    assert (error.nan_count, error.posinf_count, error.neginf_count, error.overflow_count) == (
        2,
        1,
        1,
        2,
    )
    assert error.bad_count == 6
    assert error.first_index == (0, 1)
    assert (error.layer, error.tensor, error.dtype, error.shape, error.numel) == (
        "q_proj",
        "weight",
        torch.float16,
        (4, 2),
        8,
    )


def test_message_says_what_where_how_bad_and_what_to_do() -> None:
    error = non_finite_error(
        [torch.tensor([0.0, 0.0, 1e5])],
        layer="blocks.3.attn",
        tensor="weight",
        dtype=torch.float16,
        shape=(3,),
    )
    message = str(error)
    for fragment in (
        "'blocks.3.attn'",
        "float16",
        "1 non-finite of 3 elements",
        "1 finite in float32 but beyond float16's range (|x| > 65504)",
        "index (2,)",
        "was not changed",
        "lower the scale",
    ):
        assert fragment in message


def test_float8_e4m3fn_saturation_counts_as_overflow() -> None:
    error = non_finite_error(
        [torch.tensor([500.0, 448.0])],
        layer="l",
        tensor="weight",
        dtype=torch.float8_e4m3fn,
        shape=(2,),
    )
    assert (error.overflow_count, error.first_index) == (1, (0,))


def test_check_vector_raises_for_the_bias() -> None:
    with pytest.raises(NonFiniteMergeError) as caught:
        check_vector(
            torch.tensor([1.0, float("inf")]), layer="fc", tensor="bias", dtype=torch.bfloat16
        )
    assert caught.value.tensor == "bias"
    assert caught.value.posinf_count == 1
    assert isinstance(caught.value, SafemergeError) and isinstance(caught.value, ValueError)
