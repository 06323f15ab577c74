"""The train/eval sampler: seeded per-epoch order, rank shards, mid-epoch resume."""

from gpt_lightning.data.sampler import ShardedSampler


def shard(n, rank, world, **kw):
    s = ShardedSampler(n, **{"shuffle": True, "seed": 3, "equal_shards": True} | kw)
    s.rank, s.world = rank, world
    return s


def test_the_order_depends_on_seed_and_epoch_only():
    a, b = shard(50, 0, 1), shard(50, 0, 1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) != list(shard(50, 0, 1, seed=4))


def test_two_ranks_of_batch_4_read_the_global_batches_of_one_rank_of_batch_8():
    one = list(shard(40, 0, 1))
    r0, r1 = list(shard(40, 0, 2)), list(shard(40, 1, 2))
    assert len(r0) == len(r1) == 20
    for k in range(5):
        assert sorted(r0[4 * k: 4 * k + 4] + r1[4 * k: 4 * k + 4]) == sorted(one[8 * k: 8 * k + 8])


def test_equal_train_shards_and_complete_eval_shards():
    assert [len(shard(41, r, 2)) for r in (0, 1)] == [20, 20]
    evals = [list(shard(41, r, 2, shuffle=False, equal_shards=False)) for r in (0, 1)]
    assert sorted(evals[0] + evals[1]) == list(range(41))


def test_resume_start_skips_once_and_keeps_the_epoch_length():
    s = shard(30, 0, 1)
    full = list(s)
    s.start = 12
    assert len(s) == 30  # Lightning counts the restored batches towards the epoch
    assert list(s) == full[12:]
    assert list(s) == full  # the next pass starts at the beginning again
