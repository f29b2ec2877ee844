"""Which examples each optimizer step takes, and how a global batch is split over processes."""

from __future__ import annotations

import pytest

from eetq_lora.errors import DataError
from eetq_lora.training.schedule import LENGTH_GROUP, BatchSchedule, micro_batches


def epoch_batches(schedule: BatchSchedule, epoch: int) -> list[list[int]]:
    start = epoch * schedule.steps_per_epoch
    return [schedule.global_batch_at(step) for step in range(start, start + schedule.steps_per_epoch)]


def test_small_data_is_cut_into_length_sorted_batches_in_a_shuffled_order():
    # 8 examples, batches of 2: all of them fit one length group, so every epoch holds the same four
    # batches, each of examples of neighbouring lengths, listed shortest first; only their order changes.
    lengths = [5, 1, 4, 2, 8, 7, 3, 6]
    schedule = BatchSchedule(lengths, global_batch=2, seed=0)
    assert schedule.steps_per_epoch == 4
    by_length = [[1, 3], [6, 2], [0, 7], [5, 4]]  # indices of lengths (1, 2), (3, 4), (5, 6), (7, 8)
    orders = []
    for epoch in range(6):
        batches = epoch_batches(schedule, epoch)
        assert sorted(batches) == sorted(by_length), epoch
        orders.append(batches)
    assert any(order != orders[0] for order in orders[1:])  # the order is shuffled per epoch


def test_a_partial_last_batch_is_dropped_and_every_batch_is_distinct():
    lengths = list(range(30, 0, -1))
    schedule = BatchSchedule(lengths, global_batch=4, seed=3)
    assert schedule.steps_per_epoch == 7  # 28 of the 30 examples per epoch
    for epoch in range(3):
        batches = epoch_batches(schedule, epoch)
        used = [index for batch in batches for index in batch]
        assert len(used) == len(set(used)) == 28 and set(used) <= set(range(30))
        for batch in batches:
            assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)


def test_with_batches_of_one_each_epoch_visits_every_example_once():
    lengths = [3] * 20  # more than one length group (LENGTH_GROUP examples each)
    assert len(lengths) > LENGTH_GROUP
    schedule = BatchSchedule(lengths, global_batch=1, seed=7)
    for epoch in range(2):
        assert sorted(index for batch in epoch_batches(schedule, epoch) for index in batch) == list(range(20))


def test_the_batches_depend_only_on_the_seed_and_the_step():
    lengths = [1 + (7 * i) % 13 for i in range(40)]
    straight = BatchSchedule(lengths, 4, seed=11)
    sequence = [straight.global_batch_at(step) for step in range(25)]
    # A resumed run starts at any step, in a fresh schedule: it sees the same batches from there on.
    resumed = BatchSchedule(lengths, 4, seed=11)
    assert [resumed.global_batch_at(step) for step in range(17, 25)] == sequence[17:]
    assert [resumed.global_batch_at(step) for step in range(25)] == sequence
    other_seed = BatchSchedule(lengths, 4, seed=12)
    assert [other_seed.global_batch_at(step) for step in range(25)] != sequence


def test_too_little_data_or_an_empty_batch_is_refused():
    with pytest.raises(DataError, match=r"3 example\(s\), fewer than one global batch of 4.*--batch-size"):
        BatchSchedule([1, 2, 3], 4, seed=0)
    with pytest.raises(ValueError, match="global batch must be positive"):
        BatchSchedule([1, 2, 3], 0, seed=0)


def test_micro_batches_are_contiguous_slices_per_process_and_accumulation_step():
    batch = [10, 11, 12, 13, 14, 15, 16, 17]
    # 2 processes x 2 accumulation steps of 2 examples: slice k = accum * world + rank.
    assert micro_batches(batch, world_size=2, rank=0, grad_accum=2) == [[10, 11], [14, 15]]
    assert micro_batches(batch, world_size=2, rank=1, grad_accum=2) == [[12, 13], [16, 17]]
    assert micro_batches(batch, world_size=1, rank=0, grad_accum=1) == [batch]
    assert micro_batches(batch, world_size=4, rank=3, grad_accum=1) == [[16, 17]]
    every = [i for rank in range(2) for part in micro_batches(batch, 2, rank, 4) for i in part]
    assert sorted(every) == batch  # each example exactly once over the processes and steps


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="a global batch of 6 does not split into 2 x 2 micro-batches"):
        micro_batches(list(range(6)), world_size=2, rank=0, grad_accum=2)
