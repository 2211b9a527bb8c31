"""LoRA dropout's masks on the CPU (ftcli/strategies/dropout.py): SplitMix64 bit for bit, Bernoulli(1 − p) per
element, independent between neighbours and between calls, governed by torch's seed, the same on 1 and 2 threads."""

from __future__ import annotations

import math

import pytest
import torch

from ftcli.strategies.dropout import dropout, keep_mask, splitmix64

M64 = (1 << 64) - 1


def reference_splitmix64(seed: int, n: int) -> list[int]:
    """SplitMix64 as published (Steele, Lea & Flood 2014; Vigna's C code), on Python's unbounded integers."""
    state, out = seed & M64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("seed", [0, 1, 12345, -(1 << 62), (1 << 62) - 1, -7])
def test_splitmix64_equals_the_published_generator_bit_for_bit(seed):
    got = [v & M64 for v in splitmix64(seed, 257).tolist()]
    assert got == reference_splitmix64(seed, 257)


def within(count: int, n: int, prob: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * prob) <= sigmas * math.sqrt(n * prob * (1 - prob))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1001]), p)  # odd count: the last 64-bit word is half used
    assert mask.dtype == torch.bool and mask.shape == (1000, 1001)
    assert within(int(mask.sum()), mask.numel(), 1 - p)


def test_neighbours_and_successive_masks_are_independent():
    """Each 64-bit output gives two elements: the four (kept, kept) combinations of neighbours (the two halves of a
    word, and the last of one word with the first of the next) and of the same element in two successive masks
    each come a quarter of the time at p = 0.5."""
    torch.manual_seed(3)
    first, second = keep_mask(torch.Size([1 << 20]), 0.5), keep_mask(torch.Size([1 << 20]), 0.5)
    pairs = {"halves of a word": (first[0::2], first[1::2]), "across words": (first[1:-1:2], first[2::2]),
             "two calls": (first, second)}
    for name, (a, b) in pairs.items():
        n = a.numel()
        for x in (False, True):
            for y in (False, True):
                assert within(int(((a == x) & (b == y)).sum()), n, 0.25), (name, x, y)


def test_masks_follow_torchs_seed_and_not_the_thread_count():
    threads = torch.get_num_threads()
    try:
        masks = []
        for n_threads in (1, 2, 1):
            torch.set_num_threads(n_threads)
            torch.manual_seed(7)
            masks.append((keep_mask(torch.Size([300, 577]), 0.1), keep_mask(torch.Size([300, 577]), 0.1)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(m[0], masks[0][0]) and torch.equal(m[1], masks[0][1]) for m in masks)
    assert not torch.equal(masks[0][0], masks[0][1])  # the seed advances between calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scales_what_it_keeps_and_zeroes_the_rest(dtype):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.manual_seed(1)
    out, mask = dropout(x, 0.2)
    assert out.dtype == dtype and mask.dtype == torch.bool
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.equal(out[mask], x[mask] * (1 / 0.8))
    torch.manual_seed(1)
    assert torch.equal(keep_mask(x.shape, 0.2), mask)  # the mask is keep_mask's, drawn from the same seed
