"""Tests for sparsetrain.maskops: exact counts, hand-worked masks, N:M groups, mask differences."""

from __future__ import annotations

import pytest
import torch

from sparsetrain import maskops
from sparsetrain.maskops import (
    check_nm_shape,
    global_topk_masks,
    keep_count,
    nm_mask,
    parse_nm,
    relative_mask_difference,
    topk_mask,
)

T, F = True, False

# The 8 scores used by the hand-worked cases (magnitudes: the caller takes abs).
SCORES8 = [0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.5, 0.4]


def _mask(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------- keep_count
@pytest.mark.parametrize(
    ("n", "sparsity", "kept"),
    [
        (10, 0.0, 10),
        (10, 0.5, 5),
        (10, 0.9, 1),  # (1 - 0.9) * 10 = 0.9999999999999998 in floats
        (100, 0.9, 10),
        (1000, 0.98, 20),
        (48000, 0.98, 960),  # 960.0000000000009 in floats
        (235200, 0.9, 23520),  # 23519.999999999996 in floats
        (1961, 0.9, 196),  # 196.1 rounds down
        (6, 0.9, 1),  # 0.6 rounds up
        (3, 0.9, 0),  # 0.3 rounds down: a tiny layer can lose everything
        (7, 0.5, 4),  # 3.5
        (0, 0.5, 0),
        (8, 0.25, 6),
        (8, 0.75, 2),
    ],
)
def test_keep_count_table(n, sparsity, kept):
    assert keep_count(n, sparsity) == kept
    assert isinstance(keep_count(n, sparsity), int)


# ----------------------------------------------------------------------------------------------- topk_mask
# Expected number of kept elements, written out: n -> {sparsity: kept}.
KEPT_TABLE = {
    1000: {0.0: 1000, 0.5: 500, 0.9: 100, 0.98: 20},
    250: {0.0: 250, 0.5: 125, 0.9: 25, 0.98: 5},
    2400: {0.0: 2400, 0.5: 1200, 0.9: 240, 0.98: 48},
}
SHAPES = {1000: (1000,), 250: (10, 25), 2400: (16, 6, 5, 5)}
CASES = [(n, s, k) for n, row in KEPT_TABLE.items() for s, k in row.items()]


@pytest.mark.parametrize(("n", "sparsity", "kept"), CASES)
def test_topk_mask_exact_count_random(n, sparsity, kept):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(SHAPES[n], generator=g).abs()
    mask = topk_mask(scores, sparsity)
    assert mask.dtype == torch.bool
    assert mask.shape == scores.shape
    assert int(mask.sum()) == kept
    assert int((~mask).sum()) == n - kept
    if 0 < kept < n:
        # The kept ones are the largest.
        assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize(("n", "sparsity", "kept"), CASES)
def test_topk_mask_exact_count_all_ties(n, sparsity, kept):
    scores = torch.full(SHAPES[n], 0.5)
    mask = topk_mask(scores, sparsity)
    assert int(mask.sum()) == kept  # a threshold comparison would keep all n


@pytest.mark.parametrize(("n", "sparsity", "kept"), CASES)
def test_topk_mask_exact_count_many_zeros(n, sparsity, kept):
    g = torch.Generator().manual_seed(7)
    scores = torch.zeros(n)
    nonzero = n // 20  # 5% nonzero
    positions = torch.randperm(n, generator=g)[:nonzero]
    scores[positions] = torch.rand(nonzero, generator=g) + 0.1
    scores = scores.view(SHAPES[n])
    mask = topk_mask(scores, sparsity)
    assert int(mask.sum()) == kept
    nz = scores != 0
    if kept >= nonzero:
        # Every nonzero is kept, the rest of the budget goes to zeros.
        assert bool(mask[nz].all())
    else:
        # Only nonzeros are kept, and they are the largest.
        assert not bool(mask[~nz].any())
        assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize(
    ("sparsity", "expected"),
    [
        (0.0, [T, T, T, T, T, T, T, T]),
        (0.25, [F, T, T, T, F, T, T, T]),  # keep 6: drop 0.1 and 0.2 (complement path)
        (0.5, [F, T, F, T, F, T, T, F]),  # keep 4: 0.9, 0.7, 0.8, 0.5
        (0.75, [F, T, F, F, F, T, F, F]),  # keep 2: 0.9, 0.8
        (0.9, [F, T, F, F, F, F, F, F]),  # keep round(0.8) = 1: 0.9
    ],
)
def test_topk_mask_hand_worked(sparsity, expected):
    scores = torch.tensor(SCORES8)
    assert topk_mask(scores, sparsity).tolist() == expected
    # Same answer in a 2x4 shape, returned in that shape.
    mask2d = topk_mask(scores.view(2, 4), sparsity)
    assert mask2d.shape == (2, 4)
    assert mask2d.reshape(-1).tolist() == expected


def test_topk_mask_abs_taken_by_caller():
    # Signed weights: the caller scores by |w|, so -0.9 is the largest.
    weights = torch.tensor([0.1, -0.9, 0.3, -0.7, 0.2, 0.8, -0.5, 0.4])
    assert topk_mask(weights.abs(), 0.5).tolist() == [F, T, F, T, F, T, T, F]
    # Without abs, the negative ones are the smallest.
    assert topk_mask(weights, 0.5).tolist() == [F, F, T, F, T, T, F, T]


def test_topk_mask_does_not_modify_input():
    scores = torch.tensor(SCORES8)
    before = scores.clone()
    topk_mask(scores, 0.5)
    assert torch.equal(scores, before)


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (0, [F, F, F, F, F, F, F, F]),
        (1, [F, T, F, F, F, F, F, F]),
        (3, [F, T, F, T, F, T, F, F]),  # keep < n - keep: topk of the largest
        (4, [F, T, F, T, F, T, T, F]),  # keep == n - keep
        (5, [F, T, F, T, F, T, T, T]),  # keep > n - keep: complement (drop the 3 smallest)
        (7, [F, T, T, T, T, T, T, T]),
        (8, [T, T, T, T, T, T, T, T]),
        (12, [T, T, T, T, T, T, T, T]),
    ],
)
def test_select_both_paths(keep, expected):
    assert maskops._select(torch.tensor(SCORES8), keep).tolist() == expected


@pytest.mark.parametrize("keep", [1, 3, 5, 7])
def test_select_both_paths_count_with_ties(keep):
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert int(maskops._select(scores, keep).sum()) == keep
    scores = torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0])
    mask = maskops._select(scores, keep)
    assert int(mask.sum()) == keep
    if keep <= 4:
        assert bool((scores[mask] == 2.0).all())
    else:
        assert bool(mask[scores == 2.0].all())


# ----------------------------------------------------------------------------------------------- global top-k
def test_global_topk_hand_worked_one_layer_loses_everything():
    scores = {
        "small": torch.tensor([0.1, 0.2, 0.3, 0.4]),
        "large": torch.tensor([[5.0, 6.0], [7.0, 8.0]]),
    }
    masks = global_topk_masks(scores, 0.5)  # keep 4 of 8
    assert masks["small"].tolist() == [F, F, F, F]
    assert masks["large"].tolist() == [[T, T], [T, T]]


def test_global_topk_hand_worked_mixed():
    scores = {
        "a": torch.tensor([[0.1, 9.0], [0.3, 0.4]]),
        "b": torch.tensor([[5.0, 0.05], [6.0, 7.0], [0.2, 8.0]]),
    }
    masks = global_topk_masks(scores, 0.6)  # keep 4 of 10: 9, 8, 7, 6
    assert masks["a"].tolist() == [[F, T], [F, F]]
    assert masks["b"].tolist() == [[F, F], [T, T], [F, T]]
    assert list(masks) == ["a", "b"]


LENET_PARTS = {"conv1": (6, 1, 5, 5), "fc1": (120, 400), "fc3": (10, 84)}  # 150 + 48000 + 840 = 48990


@pytest.mark.parametrize(("sparsity", "kept"), [(0.0, 48990), (0.5, 24495), (0.9, 4899), (0.98, 980)])
def test_global_topk_total_count_and_largest(sparsity, kept):
    g = torch.Generator().manual_seed(3)
    scores = {n: torch.randn(s, generator=g).abs() for n, s in LENET_PARTS.items()}
    masks = global_topk_masks(scores, sparsity)
    assert set(masks) == set(scores)
    for name, shape in LENET_PARTS.items():
        assert masks[name].shape == shape
        assert masks[name].dtype == torch.bool
    assert sum(int(m.sum()) for m in masks.values()) == kept
    if kept < 48990:
        kept_min = min(float(scores[n][masks[n]].min()) for n in scores if masks[n].any())
        dropped_max = max(float(scores[n][~masks[n]].max()) for n in scores if (~masks[n]).any())
        assert kept_min >= dropped_max


@pytest.mark.parametrize(("sparsity", "kept"), [(0.5, 24495), (0.9, 4899), (0.98, 980)])
def test_global_topk_total_count_with_ties(sparsity, kept):
    scores = {n: torch.ones(s) for n, s in LENET_PARTS.items()}
    masks = global_topk_masks(scores, sparsity)
    assert sum(int(m.sum()) for m in masks.values()) == kept


@pytest.mark.parametrize("concat_below", [1 << 20, 1])  # both paths: concatenated, and bracketed threshold
def test_global_topk_ties_shared_across_layers_in_proportion(concat_below):
    """All scores equal (a constant init): every layer keeps its share, none is emptied, the count is exact."""
    scores = {n: torch.ones(s) for n, s in LENET_PARTS.items()}
    masks = global_topk_masks(scores, 0.98, concat_below=concat_below)  # keep 980 of 48990
    # 980 * (150, 48000, 840) / 48990 = 3.0006, 960.2, 16.80: floors 3, 960, 16; the one place left goes to the
    # largest remainder (fc3's 0.80).
    assert [int(masks[n].sum()) for n in LENET_PARTS] == [3, 960, 17]
    # Spread within each layer: fc1 (120 rows of 400) keeps 8 in every row, not 960 in its first 3 rows.
    assert masks["fc1"].sum(dim=1).tolist() == [8] * 120


@pytest.mark.parametrize("concat_below", [1 << 20, 1])
def test_global_topk_ties_at_the_threshold_only_are_shared(concat_below):
    """Scores above the threshold are all kept; only the tied ones are shared, by how many each layer holds."""
    scores = {
        "a": torch.tensor([9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]),  # one above, five tied
        "b": torch.tensor([1.0] * 10 + [8.0, 7.0]),  # two above, ten tied
        "c": torch.tensor([0.5, 0.5]),  # below the threshold
    }
    masks = global_topk_masks(scores, 1 - 9 / 22, concat_below=concat_below)  # keep 9 of 22: 3 above, 6 of 15 ties
    assert [int(masks[n].sum()) for n in scores] == [1 + 2, 2 + 4, 0]
    assert masks["a"][0] and masks["b"][10] and masks["b"][11]


def test_global_topk_ties_never_empty_a_layer_by_parameter_order():
    """Two equal layers of equal weights at 50%: half of each, where a tie-break by order emptied the second."""
    scores = {"first": torch.full((10, 10), 0.25), "second": torch.full((10, 10), 0.25)}
    for concat_below in (1 << 20, 1):
        masks = global_topk_masks(scores, 0.5, concat_below=concat_below)
        assert [int(m.sum()) for m in masks.values()] == [50, 50]


@pytest.mark.parametrize(
    ("places", "counts", "shares"),
    [(10, [3, 3, 4], [3, 3, 4]), (2, [1, 1, 1], [1, 1, 0]), (7, [10, 5, 5], [3, 2, 2]), (0, [4, 4], [0, 0])],
)
def test_proportional_shares_table(places, counts, shares):
    assert maskops._proportional_shares(places, counts) == shares


def test_global_topk_masks_are_independent_tensors():
    scores = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
    masks = global_topk_masks(scores, 0.5)
    masks["a"][0] = True
    assert masks["b"].tolist() == [T, T]
    assert masks["a"].tolist() == [T, F]


def test_global_topk_empty():
    assert global_topk_masks({}, 0.5) == {}


# ----------------------------------------------------------------------------------------------- N:M
def _groups_along_dim1(mask: torch.Tensor, m: int) -> torch.Tensor:
    return mask.movedim(1, -1).reshape(-1, m)


@pytest.mark.parametrize(
    ("shape", "n", "m"),
    [((8, 16), 2, 4), ((5, 12), 1, 4), ((4, 8, 3, 3), 2, 4), ((6, 16, 1, 1), 2, 8), ((3, 8, 2, 5), 3, 4)],
)
def test_nm_mask_keeps_n_of_every_m_along_dim1(shape, n, m):
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(shape, generator=g).abs()
    mask = nm_mask(scores, n, m)
    assert mask.shape == scores.shape
    assert mask.dtype == torch.bool
    groups = _groups_along_dim1(mask, m)
    assert groups.shape[0] == scores.numel() // m
    assert bool((groups.sum(dim=1) == n).all())
    # Within each group the kept are the largest.
    score_groups = _groups_along_dim1(scores, m)
    kept_min = torch.where(groups, score_groups, torch.full_like(score_groups, float("inf"))).min(dim=1).values
    dropped_max = torch.where(~groups, score_groups, torch.full_like(score_groups, -float("inf"))).max(dim=1).values
    assert bool((kept_min >= dropped_max).all())
    assert int(mask.sum()) == scores.numel() * n // m


def test_nm_mask_hand_worked_2_4_row():
    scores = torch.tensor([SCORES8])  # groups [0.1, 0.9, 0.3, 0.7] and [0.2, 0.8, 0.5, 0.4]
    assert nm_mask(scores, 2, 4).tolist() == [[F, T, F, T, F, T, T, F]]
    assert nm_mask(scores, 1, 4).tolist() == [[F, T, F, F, F, T, F, F]]


def test_nm_mask_hand_worked_conv_groups_run_along_input_channels():
    # Shape (out=1, in=4, kh=1, kw=2): groups are the 4 input channels at each spatial position.
    scores = torch.zeros(1, 4, 1, 2)
    scores[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scores[0, :, 0, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    mask = nm_mask(scores, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [F, F, T, T]
    assert mask[0, :, 0, 1].tolist() == [T, T, F, F]


def test_nm_mask_hand_worked_linear_groups_do_not_cross_rows():
    # Two output rows of 4 inputs: each row is its own group.
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [8.0, 7.0, 6.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[F, F, T, T], [T, T, F, F]]


def test_nm_mask_hand_worked_transposed_weight_groups_run_along_dim0():
    # A transposed (in=4, out=2) weight (Hugging Face Conv1D): each output column's 4 inputs are one group.
    scores = torch.tensor([[1.0, 8.0], [2.0, 7.0], [3.0, 6.0], [4.0, 5.0]])
    assert nm_mask(scores, 2, 4, input_dim=0).tolist() == [[F, T], [F, T], [T, F], [T, F]]
    assert nm_mask(scores, 2, 4, input_dim=0).equal(nm_mask(scores.T, 2, 4).T)


def test_check_nm_shape_reads_the_given_input_dim():
    check_nm_shape((8, 6), 2, 4, input_dim=0)  # 8 inputs on dim 0: fits
    with pytest.raises(ValueError, match=r"input dimension \(6\) that is not a multiple of 4"):
        check_nm_shape((8, 6), 2, 4)
    with pytest.raises(ValueError, match=r"input dimension \(dim 0\) \(6\) that is not a multiple of 4"):
        check_nm_shape((6, 8), 2, 4, input_dim=0)


def test_nm_mask_exact_with_ties():
    mask = nm_mask(torch.ones(4, 8, 3, 3), 2, 4)
    assert bool((_groups_along_dim1(mask, 4).sum(dim=1) == 2).all())


@pytest.mark.parametrize("shape", [(4, 6), (4, 10, 3, 3), (2, 3)])
def test_nm_mask_rejects_input_dim_not_multiple_of_m(shape):
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(shape), 2, 4)


def test_nm_mask_rejects_1d():
    with pytest.raises(ValueError, match="at least 2 dims"):
        nm_mask(torch.rand(8), 2, 4)


# ----------------------------------------------------------------------------------------------- parse_nm
@pytest.mark.parametrize(("text", "expected"), [("2:4", (2, 4)), ("1:8", (1, 8)), ("4:4", (4, 4)), (" 2 : 4 ", (2, 4))])
def test_parse_nm_valid(text, expected):
    assert parse_nm(text) == expected


def test_parse_nm_unstructured():
    assert parse_nm("unstructured") is None


@pytest.mark.parametrize("text", ["5:4", "0:4", "x", "2-4", "2:", "", "2:4:8"])
def test_parse_nm_invalid_mentions_value(text):
    with pytest.raises(ValueError) as info:
        parse_nm(text)
    assert repr(text) in str(info.value)


# ----------------------------------------------------------------------------------------------- mask difference
def test_relative_mask_difference_identical():
    a = {"w": _mask([T, T, F, F, T, F, T, F])}
    assert relative_mask_difference(a, {"w": a["w"].clone()}) == 0.0


def test_relative_mask_difference_complete_swap():
    old = {"w": _mask([T, T, F, F])}
    new = {"w": _mask([F, F, T, T])}
    assert relative_mask_difference(old, new) == pytest.approx(1.0)


def test_relative_mask_difference_one_swap_of_four():
    old = {"w": _mask([T, T, T, T, F, F, F, F])}
    new = {"w": _mask([T, T, T, F, T, F, F, F])}
    assert relative_mask_difference(old, new) == pytest.approx(0.25)


def test_relative_mask_difference_superset_is_zero():
    old = {"w": _mask([T, T, F, F, F, F])}
    new = {"w": _mask([T, T, T, T, F, F])}
    assert relative_mask_difference(old, new) == 0.0
    # And the other way round (pure pruning of a superset).
    assert relative_mask_difference(new, old) == 0.0


def test_relative_mask_difference_growth_plus_swap():
    # k: 4 -> 5; H = 3 (pos 3 out, pos 4 and 5 in); (3 - 1) / (2 * 4) = 0.25
    old = {"w": _mask([T, T, T, T, F, F, F, F])}
    new = {"w": _mask([T, T, T, F, T, T, F, F])}
    assert relative_mask_difference(old, new) == pytest.approx(0.25)


def test_relative_mask_difference_summed_over_layers():
    # Layer a unchanged (2 kept), layer b one swap (2 kept): H = 2, k = 4 -> 2 / 8.
    old = {"a": _mask([T, T, F]), "b": _mask([[T, F], [T, F]])}
    new = {"a": _mask([T, T, F]), "b": _mask([[F, T], [T, F]])}
    assert relative_mask_difference(old, new) == pytest.approx(0.25)


def test_relative_mask_difference_empty_mask():
    assert relative_mask_difference({"w": _mask([F, F])}, {"w": _mask([T, F])}) == 0.0


# ----------------------------------------------------------------------------------------------- check_sparsity
@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.999])
def test_check_sparsity_accepts(value):
    assert maskops.check_sparsity(value) == float(value)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "high", True, None])
def test_check_sparsity_rejects(value):
    with pytest.raises(ValueError) as info:
        maskops.check_sparsity(value)
    assert repr(value) in str(info.value)
    assert "[0, 1)" in str(info.value)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_global_topk_large_path_is_exact_and_ranks_globally(sparsity):
    """The bracketed-threshold path (used above 1M scores) keeps exactly k, the largest ones, ties spread."""
    g = torch.Generator().manual_seed(3)
    scores = {
        "a": torch.rand(300, 200, generator=g),
        "ties": torch.full((100, 50), 0.75),
        "b": torch.rand(7, generator=g) * 2,
        "c": torch.rand(40, 40, 3, 3, generator=g) * 0.5,
    }
    total = sum(t.numel() for t in scores.values())
    masks = maskops.global_topk_masks(scores, sparsity, concat_below=1)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == maskops.keep_count(total, sparsity)
    smallest_kept = min(float(scores[n][m].min()) for n, m in masks.items() if m.any())
    largest_dropped = max(float(scores[n][~m].max()) for n, m in masks.items() if (~m).any())
    assert smallest_kept >= largest_dropped
    for name, mask in masks.items():
        assert mask.shape == scores[name].shape and mask.dtype == torch.bool
    # Ties at the threshold are spread evenly over the tied layer: gaps between kept entries differ by at most 1.
    tied = masks["ties"].reshape(-1)
    if 1 < int(tied.sum()) < tied.numel():
        gaps = tied.nonzero().squeeze(1).diff()
        assert int(gaps.max()) - int(gaps.min()) <= 1


# ----------------------------------------------------------------------------------------------- shared rules
def test_count_zeros_counts_negative_zero_and_not_nan():
    t = torch.tensor([0.0, -0.0, 1.0, float("nan"), float("inf"), 0.0])
    assert maskops.count_zeros(t) == 3
    assert maskops.count_zeros(torch.tensor([True, False, False])) == 2


def test_nm_sparsity_is_fixed_by_the_mask_type():
    assert maskops.nm_sparsity("2:4") == 0.5
    assert maskops.nm_sparsity("2:4", 0.5) == 0.5
    assert maskops.nm_sparsity("1:8") == 0.875
    assert maskops.nm_sparsity("unstructured", 0.9) == 0.9
    assert maskops.nm_sparsity("unstructured") is None
    with pytest.raises(ValueError, match=r"'2:4' fixes the sparsity at 0.5; got sparsity=0.9"):
        maskops.nm_sparsity("2:4", 0.9)


def test_check_nm_shape_names_the_weight_and_the_remedy():
    maskops.check_nm_shape((8, 16, 3, 3), 2, 4)
    with pytest.raises(ValueError, match=r"parameter 'fc' of shape \(8, 6\).*\(6\).*multiple of 4; drop it"):
        maskops.check_nm_shape((8, 6), 2, 4, what="parameter 'fc'", remedy="drop it")
    with pytest.raises(ValueError, match="at least 2 dims"):
        maskops.check_nm_shape((8,), 2, 4)
