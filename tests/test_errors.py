"""Every bad input to Slice / Mask construction raises a MaskError that names the problem."""

import pytest

import maskc
from maskc import Kind, Mask, MaskError, Slice


@pytest.mark.parametrize(
    "args, message",
    [
        (((5, 3), (0, 4), Kind.FULL), r"q range = \(5, 3\) has negative length \(end 3 < start 5\)"),
        (((0, 3), (4, 2), Kind.FULL), r"k range = \(4, 2\) has negative length"),
        (((-1, 3), (0, 4), Kind.FULL), r"q range = \(-1, 3\) starts below 0"),
        (((0.0, 3), (0, 4), Kind.FULL), r"q range start must be an integer, got 0.0 \(float\)"),
        (((0, 3), (0, "4"), Kind.FULL), r"k range end must be an integer, got '4' \(str\)"),
        (((0, 3), (0, True), Kind.FULL), r"k range end must be an integer, got True \(bool\)"),
        (((0, 3), (0, 4), 7), r"unknown kind 7; allowed: FULL \(0\), CAUSAL \(1\), INV_CAUSAL \(2\), BI_CAUSAL \(3\)"),
        (((0, 3), (0, 4), "sideways"), "unknown kind 'sideways'"),
        (((0, 3, 4), (0, 4), 0), r"q range must be a half-open \(start, end\) pair"),
    ],
)
def test_slice_errors(args, message):
    with pytest.raises(MaskError, match=message):
        Slice(*args)


def test_kind_parsing():
    assert Slice((0, 1), (0, 1), "causal").kind is Kind.CAUSAL
    assert Slice((0, 1), (0, 1), "bi-causal").kind is Kind.BI_CAUSAL
    assert Slice((0, 1), (0, 1), 2).kind is Kind.INV_CAUSAL
    import numpy as np

    assert Slice((np.int32(0), np.int64(1)), (0, 1), np.int8(3)).kind is Kind.BI_CAUSAL


@pytest.mark.parametrize(
    "slices, sq, sk, message",
    [
        ([((0, 5), (0, 4), 0)], 4, 4, r"slice 0 Slice\(q=\(0, 5\), k=\(0, 4\), FULL\) is out of bounds: q must lie in \[0, 4\)"),
        ([((0, 1), (0, 1), 0), ((0, 4), (2, 9), 1)], 4, 8, r"slice 1 .* is out of bounds: q must lie in \[0, 4\) and k in \[0, 8\)"),
        ([((0, 1), (2, 1), 0)], 4, 4, r"slice 0 \(\(0, 1\), \(2, 1\), 0\): k range = \(2, 1\) has negative length"),
        ([((0, 1), (0, 1), 9)], 4, 4, "slice 0 .*unknown kind 9"),
        ([(0, 1)], 4, 4, r"slice 0 \(0, 1\): q range must be a half-open \(start, end\) pair of integers, got 0"),
        ([7], 4, 4, r"slice 0 must be a Slice or a \(q_range, k_range, kind\) tuple, got 7"),
        ([], -2, 4, "sq must be >= 0, got -2"),
        ([], 4, 2.5, r"sk must be an integer, got 2.5 \(float\)"),
    ],
)
def test_mask_errors(slices, sq, sk, message):
    with pytest.raises(MaskError, match=message):
        Mask(slices, sq=sq, sk=sk)


def test_mask_needs_sq():
    with pytest.raises(MaskError, match="sq .* is required"):
        Mask([((0, 1), (0, 1), 0)])


def test_from_ranges_errors():
    with pytest.raises(MaskError, match="q_ranges has 2 entries but k_ranges has 1"):
        Mask.from_ranges([[0, 1], [1, 2]], [[0, 1]], [0, 0], sq=2, sk=2)
    with pytest.raises(MaskError, match="kinds has 1 entries but q_ranges has 2"):
        Mask.from_ranges([[0, 1], [1, 2]], [[0, 1], [0, 2]], [0], sq=2, sk=2)
    with pytest.raises(MaskError, match="q_ranges must be a sequence"):
        Mask.from_ranges(3, [[0, 1]], sq=2, sk=2)


def test_from_json_errors():
    with pytest.raises(MaskError, match="not valid JSON"):
        Mask.from_json("{nope")
    with pytest.raises(MaskError, match="missing key 'slices'"):
        Mask.from_json({"sq": 2, "sk": 2})
    with pytest.raises(MaskError, match=r"slice 0 must be \[qs, qe, ks, ke, kind\]"):
        Mask.from_json({"sq": 2, "sk": 2, "slices": [[0, 1, 0]]})
    with pytest.raises(MaskError, match="format is 'other'"):
        Mask.from_json({"format": "other", "sq": 2, "sk": 2, "slices": []})
    with pytest.raises(MaskError, match="out of bounds"):
        Mask.from_json({"sq": 2, "sk": 2, "slices": [[0, 3, 0, 1, 0]]})


def test_dense_refuses_huge():
    with pytest.raises(MaskError, match="use row_counts"):
        maskc.causal(1 << 17).to_dense()


def test_getitem_needs_two_positions():
    with pytest.raises(MaskError, match="takes two positions"):
        maskc.causal(4)[1]
