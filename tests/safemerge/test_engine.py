"""The blocked loop's pieces: block geometry, thread pinning, fingerprints, the joint delta."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from safemerge import NonFiniteMergeError
from safemerge.merge import engine


@pytest.mark.parametrize(
    ("rows", "columns"), [(1, 1), (3, 7), (4096, 4096), (5, 10**6), (10**6, 3)]
)
def test_blocks_start_on_whole_correction_bytes_and_fit_the_budget(rows: int, columns: int) -> None:
    block_rows = engine.block_rows_for(rows, columns)
    assert block_rows >= 1
    if block_rows < rows:
        assert block_rows % 4 == 0
        assert block_rows * columns * 4 <= max(engine.BLOCK_BYTES, 4 * 4 * columns)


def test_pinned_threads_restores_the_callers_setting() -> None:
    threads = torch.get_num_threads()
    with engine.pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError), engine.pinned_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == threads


def test_fingerprint_sees_a_changed_element_and_ignores_copies() -> None:
    tensor = torch.randn(300, 200).bfloat16()
    assert engine.fingerprint(tensor) == engine.fingerprint(tensor.clone())
    changed = tensor.clone()
    changed[0, 0] = changed[0, 0] * 2  # a sampled position
    assert engine.fingerprint(changed) != engine.fingerprint(tensor)
    swapped = tensor.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places: position-weighted
    assert engine.fingerprint(swapped) != engine.fingerprint(tensor)


def test_joint_delta_is_the_weighted_sum_of_the_terms() -> None:
    generator = torch.Generator().manual_seed(0)
    terms = [
        (torch.randn(7, 2, generator=generator), torch.randn(2, 5, generator=generator), 0.5),
        (torch.randn(7, 3, generator=generator), torch.randn(3, 5, generator=generator), -2.0),
    ]
    delta = engine.LowRankDelta.from_terms(terms, torch.device("cpu"))
    assert delta.left.shape == (7, 5) and delta.right.shape == (5, 5)
    expected = sum(
        coefficient * left.double() @ right.double() for left, right, coefficient in terms
    )
    torch.testing.assert_close((delta.left.double() @ delta.right.double()), expected)
    assert all(tensor.is_contiguous() for tensor in (delta.left, delta.right))


def test_in_place_without_a_correction_keeps_none_and_rolls_a_refusal_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In place, the correction is the journal of the fuse: without keep_correction it is
    dropped at the end, and a refusal still restores every block already written."""
    monkeypatch.setattr(engine, "BLOCK_BYTES", 16 * 4 * 8)  # 8 rows a block
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(64, 16, generator=generator).to(torch.float16)
    original = matrix.clone()
    small = engine.LowRankDelta.from_terms(
        [(torch.full((64, 1), 0.5), torch.ones(1, 16), 1.0)], torch.device("cpu")
    )
    fused = engine.fuse_matrix(
        matrix, small, layer="l", weight_shape=(64, 16), keep_correction=False, in_place=True
    )
    assert fused.merged is None and fused.correction is None
    assert torch.equal(matrix, (original.float() + 0.5).half())
    matrix.copy_(original)
    huge_last_rows = torch.zeros(64, 1)
    huge_last_rows[-1] = 1e6  # only the last block overflows float16
    with pytest.raises(NonFiniteMergeError):
        engine.fuse_matrix(
            matrix,
            engine.LowRankDelta.from_terms(
                [(huge_last_rows, torch.ones(1, 16), 1.0)], torch.device("cpu")
            ),
            layer="l",
            weight_shape=(64, 16),
            keep_correction=False,
            in_place=True,
        )
    assert torch.equal(matrix.view(torch.int16), original.view(torch.int16))


def test_on_threads_runs_the_work_on_the_caller_and_kept_helpers() -> None:
    seen: list[int] = []
    together = threading.Barrier(3, timeout=10)  # three threads at once, or it breaks

    def work() -> None:
        together.wait()
        seen.append(threading.get_ident())

    def helpers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("safemerge-blocks")}

    engine.on_threads(work, 3)
    assert len(set(seen)) == 3 and threading.get_ident() in seen
    kept = helpers()
    engine.on_threads(work, 3)
    assert helpers() == kept  # no thread started for the second call


def test_on_threads_raises_a_helper_s_error_once_every_thread_is_done() -> None:
    finished: list[str] = []
    calls = iter(range(3))
    lock = threading.Lock()

    def work() -> None:
        with lock:
            call = next(calls)
        if call == 1:
            raise ValueError("helper failed")
        time.sleep(0.05)
        finished.append("done")

    with pytest.raises(ValueError, match="helper failed"):
        engine.on_threads(work, 3)
    assert finished == ["done", "done"]  # the others ran to their end first


def test_on_threads_holds_an_interrupt_until_the_helpers_are_done() -> None:
    finished: list[str] = []
    caller = threading.get_ident()

    def work() -> None:
        if threading.get_ident() == caller:
            raise KeyboardInterrupt
        time.sleep(0.05)
        finished.append("helper")

    with pytest.raises(KeyboardInterrupt):
        engine.on_threads(work, 2)
    assert finished == ["helper"]


def test_blocks_on_shares_blocks_out_while_torch_runs_on_one_thread() -> None:
    torch_threads = torch.get_num_threads()
    with engine.blocks_on(3):
        assert (engine.block_threads(), torch.get_num_threads()) == (3, 1)
        with engine.blocks_on(2):
            assert engine.block_threads() == 2
        assert engine.block_threads() == 3
    assert engine.block_threads() == torch.get_num_threads() == torch_threads


def test_an_unfuse_of_a_one_thread_fuse_shares_its_blocks_out_and_restores_every_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fuse under blocks_on made every product on one torch thread (its record says 1):
    its unfuse may use all the block threads, torch on one, and still repeat them."""
    import safemerge

    generator = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    before = layer.weight.detach().clone()
    adapter = safemerge.LoraAdapter(
        torch.randn(8, 256, generator=generator),
        torch.randn(512, 8, generator=generator),
        magnitude=torch.rand(512, generator=generator) + 0.5,  # DoRA: torch's matmul
    )
    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 256 * 4)  # 8 blocks
    with engine.blocks_on(2):
        record = safemerge.fuse(layer, adapter)
    assert record.num_threads == 1
    seen: list[tuple[int, int]] = []
    real = engine.unfuse_matrix

    def observed(*args: object, **kwargs: object) -> object:
        seen.append((torch.get_num_threads(), engine.block_threads()))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "unfuse_matrix", observed)
    torch_threads = torch.get_num_threads()
    safemerge.unfuse(layer, record)
    assert seen == [(1, torch_threads)]
    assert torch.equal(layer.weight.detach().view(torch.int16), before.view(torch.int16))
