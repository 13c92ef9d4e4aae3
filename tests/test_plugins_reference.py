"""reference.py of both attention ops against brute force: dense masked softmax attention
(neighborhood) and the O(N^2) definition / an explicit loop (linear attention).

Everything runs in float64, so agreement is to ~1e-15 and the tolerances (1e-10) only
absorb summation order, not approximation.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from deploykit.errors import UserError
from deploykit.plugins.linear_attention import linear_attention, linear_attention_naive
from deploykit.plugins.neighborhood_attention import (
    dense_mask,
    neighborhood_attention,
    sliding_window_attention,
    window_indices,
)

TOL = 1e-10


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def dense_attention(q, k, v, mask, bias=None):
    """Plain masked softmax attention over flattened spatial axes."""
    b, h = q.shape[:2]
    n = mask.shape[-1]
    scores = q.reshape(b, h, n, -1) @ k.reshape(b, h, n, -1).transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, -1).nan_to_num(0.0) @ v.reshape(b, h, n, -1)
    return out.reshape(*q.shape[:-1], v.shape[-1])


# ----------------------------------------------------------------------------- neighborhood
def test_windows_follow_natten_rules_by_hand():
    assert window_indices(7, 3)[0].tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5],
                                                [4, 5, 6], [4, 5, 6]]
    # Even k = 4: two keys left, one right, shifted at the borders.
    assert window_indices(7, 4)[0][3].tolist() == [1, 2, 3, 4]
    assert window_indices(7, 4)[0][0].tolist() == [0, 1, 2, 3] and window_indices(7, 4)[0][6].tolist() == [3, 4, 5, 6]
    # Dilation 2 on 10: groups {0,2,4,6,8} and {1,3,5,7,9}.
    assert window_indices(10, 3, 2)[0][4].tolist() == [2, 4, 6]
    assert window_indices(10, 3, 2)[0][9].tolist() == [5, 7, 9]
    # Causal: [max(p - k + 1, 0), p].
    index, valid, _ = window_indices(6, 3, 1, True)
    assert [index[p][valid[p]].tolist() for p in range(6)] == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]


CASES = [  # spatial, kernel, dilation, causal
    ((7,), 3, 1, False),
    ((13,), 4, 2, False),          # even k, dilation, length not a multiple of d
    ((31,), 6, 5, False),          # groups of unequal length (7 and 6)
    ((17,), 5, 3, True),
    ((9, 11), (3, 4), (2, 1), (False, True)),
    ((10, 7), 3, (3, 2), False),
    ((5, 6), (5, 2), 1, (True, False)),
]


@pytest.mark.parametrize("spatial,kernel,dilation,causal", CASES)
def test_matches_dense_masked_attention(spatial, kernel, dilation, causal):
    q, k, v = rand(2, 3, *spatial, 8, seed=1), rand(2, 3, *spatial, 8, seed=2), rand(2, 3, *spatial, 5, seed=3)
    mask = dense_mask(spatial, kernel, dilation, causal)
    out = neighborhood_attention(q, k, v, kernel, dilation, causal)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask), rtol=0, atol=TOL)


@pytest.mark.parametrize("spatial,kernel,dilation", [((13,), 4, 2), ((9, 10), (3, 4), (2, 1))])
def test_every_non_causal_query_sees_exactly_k_keys(spatial, kernel, dilation):
    mask = dense_mask(spatial, kernel, dilation)
    per_query = 1
    for kk in (kernel if isinstance(kernel, tuple) else (kernel,) * len(spatial)):
        per_query *= kk
    assert torch.all(mask.sum(1) == per_query)
    assert torch.all(mask.diagonal())              # every query sees itself


def test_relative_position_bias_matches_pairwise_definition():
    spatial, kernel, dilation = (8, 9), (3, 4), (2, 1)
    q, k, v = rand(1, 2, *spatial, 4, seed=4), rand(1, 2, *spatial, 4, seed=5), rand(1, 2, *spatial, 4, seed=6)
    rpb = rand(2, 2 * kernel[0] - 1, 2 * kernel[1] - 1, seed=7)
    positions = list(itertools.product(*[range(n) for n in spatial]))
    bias = torch.zeros(2, len(positions), len(positions), dtype=torch.float64)
    for a, qi in enumerate(positions):
        for c, ki in enumerate(positions):
            # offset per axis in group coordinates: (key // d - query // d) + k - 1
            o = [kk // dd - qq // dd + kn - 1 for qq, kk, dd, kn in zip(qi, ki, dilation, kernel)]
            if all(0 <= x < 2 * kn - 1 for x, kn in zip(o, kernel)):
                bias[:, a, c] = rpb[:, o[0], o[1]]
    mask = dense_mask(spatial, kernel, dilation)
    out = neighborhood_attention(q, k, v, kernel, dilation, rpb=rpb)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask, bias[None]), rtol=0, atol=TOL)


@pytest.mark.parametrize("kernel,dilation,causal", [(5, 1, False), (4, 2, False), (3, 3, True)])
def test_padded_rows_get_the_windows_of_their_own_length(kernel, dilation, causal):
    """1-D key_mask = right padding: each row is NATTEN on its unpadded length, so its output
    does not depend on the padding; rows shorter than k * d see their whole group."""
    q, k, v = rand(3, 2, 12, 4, seed=8), rand(3, 2, 12, 4, seed=9), rand(3, 2, 12, 4, seed=10)
    lengths = [12, 9, 3]                         # 3 < k * d for every case here but (5, 1)
    key_mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    out = neighborhood_attention(q, k, v, kernel, dilation, causal, key_mask=key_mask)
    for row, n in enumerate(lengths):
        mask = dense_mask((12,), kernel, dilation, causal, length=n)
        expected = dense_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], mask)
        torch.testing.assert_close(out[row:row + 1], expected, rtol=0, atol=TOL)
        if n * 1 >= kernel * dilation:           # a full-length window: exactly NATTEN on the unpadded row
            alone = neighborhood_attention(q[row:row + 1, :, :n], k[row:row + 1, :, :n], v[row:row + 1, :, :n],
                                           kernel, dilation, causal)
            torch.testing.assert_close(out[row:row + 1, :, :n], alone, rtol=0, atol=TOL)
        assert torch.all(out[row, :, n:] == 0)   # padded queries output 0


def test_2d_key_mask_only_removes_keys():
    q, k, v = rand(2, 2, 6, 7, 4, seed=30), rand(2, 2, 6, 7, 4, seed=31), rand(2, 2, 6, 7, 4, seed=32)
    key_mask = torch.ones(2, 6, 7, dtype=torch.bool)
    key_mask[1, 3:, :] = False
    mask = dense_mask((6, 7), 3)[None, None] & key_mask.reshape(2, 1, 1, 42)
    out = neighborhood_attention(q, k, v, 3, key_mask=key_mask)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask), rtol=0, atol=TOL)


def test_key_mask_must_be_right_padding():
    q = rand(1, 1, 6, 4)
    with pytest.raises(UserError, match="right padding"):
        neighborhood_attention(q, q, q, 3, key_mask=torch.tensor([[False, True, True, True, True, True]]))


def test_llm_sliding_window_is_causal_band():
    q, k, v = rand(1, 2, 20, 4, seed=11), rand(1, 2, 20, 4, seed=12), rand(1, 2, 20, 4, seed=13)
    i = torch.arange(20)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 6)     # itself and the 5 before it
    torch.testing.assert_close(sliding_window_attention(q, k, v, 6), dense_attention(q, k, v, band),
                               rtol=0, atol=TOL)


def test_window_rules_are_enforced():
    q = rand(1, 1, 10, 4)
    with pytest.raises(UserError, match="exceeds the length"):
        neighborhood_attention(q, q, q, 4, 3)                 # 4 x 3 = 12 > 10
    with pytest.raises(UserError, match="causal"):
        neighborhood_attention(q, q, q, 3, 1, True, rpb=rand(1, 5))
    with pytest.raises(UserError, match="entries for 2 axes"):
        neighborhood_attention(rand(1, 1, 5, 5, 4), rand(1, 1, 5, 5, 4), rand(1, 1, 5, 5, 4), (3, 3, 3))


# ----------------------------------------------------------------------------- linear attention
def loop_definition(q, k, v, feature, causal, decay, normalize):
    """out_i = sum_j w_ij phi(q_i).phi(k_j) v_j / sum_j w_ij phi(q_i).phi(k_j), one (b, h, i) at a time."""
    from deploykit.plugins.linear_attention.reference import EPS, feature_map

    fq, fk = feature_map(q, feature), feature_map(k, feature)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for b, h, i in itertools.product(*[range(n) for n in q.shape[:3]]):
        num, den = torch.zeros(v.shape[-1], dtype=q.dtype), torch.zeros((), dtype=q.dtype)
        for j in range(q.shape[2]):
            if causal and j > i:
                continue
            w = (decay[h] ** (i - j)) if decay is not None else 1.0
            s = w * (fq[b, h, i] @ fk[b, h, j])
            num, den = num + s * v[b, h, j], den + s
        out[b, h, i] = num / (den + EPS) if normalize else num
    return out


@pytest.mark.parametrize("feature", ["elu1", "relu", "sigmoid"])
@pytest.mark.parametrize("causal,decay", [(False, None), (True, None), (True, [0.9, 0.5])])
def test_naive_form_is_the_definition(feature, causal, decay):
    q, k, v = rand(1, 2, 9, 3, seed=14), rand(1, 2, 9, 3, seed=15), rand(1, 2, 9, 2, seed=16)
    for normalize in (True, False):
        expected = loop_definition(q, k, v, feature, causal, decay, normalize)
        got = linear_attention_naive(q, k, v, feature=feature, causal=causal, decay=decay, normalize=normalize)
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("n", [1, 17, 64, 65, 130])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_form_matches_naive_across_chunk_boundaries(n, chunk):
    q, k, v = rand(2, 3, n, 8, seed=17), rand(2, 3, n, 8, seed=18), rand(2, 3, n, 6, seed=19)
    for causal, decay in ((False, None), (True, None), (True, [0.99, 0.9, 0.6])):
        for normalize in (True, False):
            a = linear_attention(q, k, v, causal=causal, decay=decay, normalize=normalize, chunk_size=chunk)
            b = linear_attention_naive(q, k, v, causal=causal, decay=decay, normalize=normalize)
            torch.testing.assert_close(a, b, rtol=1e-9, atol=TOL)   # relative: unnormalised sums grow with n


def test_key_mask_drops_padded_keys_from_both_sums():
    q, k, v = rand(2, 2, 10, 4, seed=20), rand(2, 2, 10, 4, seed=21), rand(2, 2, 10, 4, seed=22)
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[0, 6:] = False
    for causal in (False, True):
        got = linear_attention(q, k, v, causal=causal, key_mask=key_mask, chunk_size=4)
        trimmed = linear_attention_naive(q[:1, :, :6], k[:1, :, :6], v[:1, :, :6], causal=causal)
        torch.testing.assert_close(got[:1, :, :6], trimmed, rtol=0, atol=TOL)


def test_linear_attention_rejects_bad_settings():
    q = rand(1, 2, 5, 3)
    with pytest.raises(UserError, match="needs causal"):
        linear_attention(q, q, q, decay=[0.9, 0.9])
    with pytest.raises(UserError, match="per head"):
        linear_attention(q, q, q, causal=True, decay=[0.9, 0.9, 0.9])
    with pytest.raises(UserError, match="in \\(0, 1\\]"):
        linear_attention(q, q, q, causal=True, decay=[1.5, 0.9])
    with pytest.raises(UserError, match="feature map"):
        linear_attention(q, q, q, feature="softplus")
