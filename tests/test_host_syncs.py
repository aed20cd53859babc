"""No host sync on the training hot path: CP ops and a cp=2 training step, counted on 2 gloo ranks.

tests/sync_guard.py counts the host-reading Tensor calls (.item(), .cpu(), .tolist(), bool(), ...) made
from the repository's source files (the run itself: tests/two_rank_checks.py). Each op and the step run
once first (the first call of a shape checks that the ranks agree; later calls with the same shapes
reuse that check), then once counted. The logging read (Trainer._record) is outside train_step and is
the one sync of a logged step.
"""

from __future__ import annotations

import pytest
import torch
import two_rank_checks

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", [*two_rank_checks.CP_OPS, "train_step"])
def test_no_host_sync_from_our_code(case: str) -> None:
    counts = two_rank_checks.results()["syncs"][case]
    print(f"host syncs in {case}: {sum(counts.values())} {counts}")
    assert counts == {}


def test_rank_agreement_checked_once_per_shape() -> None:
    assert two_rank_checks.results()["validate_calls"] == [1, 1, 0, 1]


def test_index_tensors_are_cached_per_device() -> None:
    from spindle.parallel.cp import halo, layout

    first = layout.chunk_index(3, "zigzag")
    assert first is layout.chunk_index(3, "zigzag", "cpu") and first.tolist() == [0, 2, 4, 5, 3, 1]
    mine = layout.local_chunk_index(1, 3, "zigzag")
    assert mine is layout.local_chunk_index(1, 3, "zigzag", "cpu") and mine.tolist() == [1, 4]
    assert halo.make_halo_plan(3, "zigzag", 4, 5) is halo.make_halo_plan(3, "zigzag", 4, 5)  # plans are immutable
    index = layout.gathered_to_global_index(12, 2, "zigzag")
    assert index is layout.gathered_to_global_index(12, 2, "zigzag")
    # rank 0 holds positions 0-2 and 9-11, rank 1 positions 3-8: the inverse permutation restores order
    gathered = torch.cat([layout.layout_positions(12, rank, 2, "zigzag") for rank in range(2)])
    assert gathered[index].tolist() == list(range(12))
