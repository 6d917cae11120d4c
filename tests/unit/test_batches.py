"""What the model is fed, in the pytest process: the windows an epoch walks (lib/data/batches.py) and how the
training processes share each batch (World.share in lib/training/distributed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.data.batches import epoch_windows, get_batch, window_starts
from lib.training.distributed import World

N_TOKENS, SEQ_LEN = 10_000, 32


def test_window_starts_tile_the_tokens_without_overlap():
    starts = window_starts(N_TOKENS, SEQ_LEN, offset=5)
    assert starts[0] == 5 and set(np.diff(starts)) == {SEQ_LEN}
    assert starts[-1] + SEQ_LEN + 1 <= N_TOKENS < starts[-1] + 2 * SEQ_LEN + 1, "as many windows as fit, +1 target"
    assert len(window_starts(SEQ_LEN, SEQ_LEN)) == 0, "a window needs seq_len + 1 tokens"
    assert list(window_starts(SEQ_LEN + 1, SEQ_LEN)) == [0]


def test_an_epoch_walks_one_shuffled_grid_of_whole_windows():
    for epoch in range(5):
        windows = epoch_windows(N_TOKENS, SEQ_LEN, seed=1337, epoch=epoch)
        offset = int(windows.min())
        assert 0 <= offset < SEQ_LEN
        assert sorted(windows) == list(window_starts(N_TOKENS, SEQ_LEN, offset)), "each window once, none overlapping"
        assert not np.array_equal(windows, np.sort(windows)), "shuffled"


def test_windows_are_seeded_and_differ_from_epoch_to_epoch():
    first = epoch_windows(N_TOKENS, SEQ_LEN, seed=1337, epoch=0)
    assert np.array_equal(first, epoch_windows(N_TOKENS, SEQ_LEN, seed=1337, epoch=0)), "a resumed run sees the same"
    later = [epoch_windows(N_TOKENS, SEQ_LEN, seed=1337, epoch=e) for e in range(1, 6)]
    assert all(not np.array_equal(first[:20], w[:20]) for w in later), "another order each epoch"
    assert len({int(w.min()) for w in [first, *later]}) > 1, "the grid's offset moves, so verses are cut elsewhere"
    assert not np.array_equal(first, epoch_windows(N_TOKENS, SEQ_LEN, seed=7, epoch=0)), "another seed, other windows"


def test_a_batch_is_the_windows_inputs_and_the_next_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, np.array([0, 64, 500]), 8, "cpu")
    assert x.dtype == torch.int64 and x.shape == y.shape == (3, 8)
    assert x[1].tolist() == list(range(64, 72)) and y[1].tolist() == list(range(65, 73))


# ----------------------------------------------------------------------------- ranks sharing a batch


def shares(windows: np.ndarray, size: int) -> list[tuple[np.ndarray, float]]:
    """What each of `size` processes takes of the global batch (World.share needs no process group)."""
    return [World(rank=rank, size=size).share(windows) for rank in range(size)]


@pytest.mark.parametrize("batch, size", [(32, 2), (32, 4), (7, 3), (5, 4)])
def test_the_ranks_slices_cover_the_batch_once_in_order(batch, size):
    windows = np.arange(100, 100 + batch)
    taken = [mine for mine, weight in shares(windows, size) if weight > 0]
    assert np.array_equal(np.concatenate(taken), windows)
    assert max(map(len, taken)) - min(map(len, taken)) <= 1, "as even as the batch allows"


def test_one_process_takes_the_whole_batch_at_weight_one():
    windows = np.arange(10)
    mine, weight = World().share(windows)
    assert mine is windows and weight == 1.0


def test_a_rank_left_without_a_window_still_computes_one_at_weight_zero():
    (first, w0), (second, w1), (third, w2) = shares(np.array([40, 80]), 3)
    assert (list(first), list(second), w0, w1) == ([40], [80], 1.5, 1.5)
    assert len(third) == 1 and w2 == 0.0, "every rank must take part in each gradient exchange"


@pytest.mark.parametrize("batch, size", [(8, 2), (7, 3), (2, 3)])
def test_the_averaged_weighted_gradients_are_the_whole_batchs_gradient(batch, size):
    """DDP averages the ranks' gradients; with the weights that is the gradient of the mean over the batch,
    also when the batch does not divide evenly (the last batch of an epoch)."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(batch, 4), torch.randn(batch)
    weights = torch.randn(4, requires_grad=True)

    def gradient(rows, scale=1.0):
        weights.grad = None
        (((inputs[rows] @ weights - targets[rows]) ** 2).mean() * scale).backward()
        return weights.grad.clone()

    whole = gradient(np.arange(batch))
    averaged = sum(gradient(rows, weight) for rows, weight in shares(np.arange(batch), size)) / size
    torch.testing.assert_close(averaged, whole)


def test_one_process_sums_gathers_and_broadcasts_its_own_values():
    world = World()
    assert world.is_main and not world.distributed
    assert world.sum([1.5, 2.0], "cpu") == [1.5, 2.0]
    assert world.gather({"rank": 0}) == [{"rank": 0}] and world.broadcast("fresh") == "fresh"
