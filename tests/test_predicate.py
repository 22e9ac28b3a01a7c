"""`from_predicate`: exact against brute force over every (i, j), equal to the builders, and every
rejection path with its message."""

import operator
from fractions import Fraction

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

import maskc
from maskc import Mask, MaskError
from maskc import predicate as P
from maskc.predicate import from_predicate

q, k = sp.symbols("q k", integer=True)

RELATIONS = {
    "<": (sp.Lt, operator.lt),
    "<=": (sp.Le, operator.le),
    ">": (sp.Gt, operator.gt),
    ">=": (sp.Ge, operator.ge),
    "==": (sp.Eq, operator.eq),
    "!=": (sp.Ne, operator.ne),
}
SCALES = [Fraction(1), Fraction(2), Fraction(-1), Fraction(1, 2), Fraction(-3, 2)]


def dense(fn, sq, sk):
    """Brute force: the predicate evaluated exactly (Python ints / Fractions) at every pair."""
    return np.array([[bool(fn(i, j)) for j in range(sk)] for i in range(sq)], dtype=bool).reshape(
        sq, sk
    )


def dense_sympy(expr, sq, sk):
    """Brute force straight from the sympy expression, by exact substitution."""
    f = sp.lambdify((q, k), expr, modules="sympy")
    return dense(lambda i, j: f(sp.Integer(i), sp.Integer(j)) == sp.true, sq, sk)


def check(pred, fn_or_none, sq, sk):
    m = from_predicate(pred, sq, sk)
    want = dense_sympy(pred, sq, sk) if fn_or_none is None else dense(fn_or_none, sq, sk)
    assert m.shape == (sq, sk)
    assert np.array_equal(m.to_dense(), want), f"{pred} on {sq}x{sk}"
    assert Mask(m.slices, sq=sq, sk=sk) == m  # canonical
    return m


# ---- random predicates: (sympy expression, exact Python evaluator) ---------------------------


def _term_fn(kind, a, s, d):
    if kind == "pos":
        return lambda v: v
    if kind == "floordiv":
        return lambda v: (a * v + s) // d
    if kind == "mod":
        return lambda v: (a * v + s) % d
    return lambda v: (v // a) // d if kind == "nested" else (v // a) % d  # "nested", "nestmod"


@st.composite
def terms(draw, x):
    """(sympy term in position x, its evaluator, its raw coefficient of x after Mod expansion)."""
    kind = draw(st.sampled_from(["pos", "floordiv", "mod", "nested", "nestmod"]))
    a = draw(st.sampled_from([1, 2, -1, 3]))
    s = draw(st.integers(-3, 3))
    d = draw(st.sampled_from([2, 3, 4]))
    if kind == "mod":
        # sympy rewrites Mod(-k, 2) as Mod(k, 2), changing the raw coefficient; these it keeps
        a, d = draw(st.sampled_from([(1, 2), (1, 3), (1, 5), (1, -3), (2, 3), (2, 4), (2, 5)]))
    if kind == "pos":
        return x, _term_fn(kind, a, s, d), 1
    whole = a % d == 0  # then floor((a*x + s)/d) = (a/d)*x + floor(s/d) and Mod is constant
    if kind == "floordiv":
        return (a * x + s) // d, _term_fn(kind, a, s, d), a // d if whole else 0
    if kind == "mod":
        return sp.Mod(a * x + s, d), _term_fn(kind, a, s, d), 0 if whole else a
    a = abs(a) + 1
    expr = (x // a) // d if kind == "nested" else sp.Mod(x // a, d)
    return expr, _term_fn(kind, a, s, d), 0


@st.composite
def linear_atoms(draw):
    """f*(c_q*T(q) + c0) OP -f*c_k*T(k); coefficients keep the boundary's slope in {0, 1, inf}."""
    tq, fq, rq = draw(terms(q)) if draw(st.booleans()) else (0, lambda v: 0, 0)
    tk, fk, rk = draw(terms(k)) if draw(st.booleans()) else (0, lambda v: 0, 0)
    cq = Fraction(draw(st.sampled_from([1, 2, -1, 3])))
    ck = Fraction(draw(st.sampled_from([1, -1, 2, -2])))
    if rq and rk:
        ck = -cq * rq / rk  # raw q and k coefficients cancel: a diagonal k - q = c
    c0 = Fraction(draw(st.integers(-6, 6)), draw(st.sampled_from([1, 1, 2, 3])))
    f = draw(st.sampled_from(SCALES))
    op = draw(st.sampled_from(sorted(RELATIONS)))
    rel, pyop = RELATIONS[op]
    def R(x):
        return sp.Rational(x.numerator, x.denominator)

    lhs = R(f) * (R(cq) * tq + R(c0))
    rhs = -R(f) * R(ck) * tk
    expr = rel(lhs, rhs, evaluate=False)
    return expr, lambda i, j: pyop(f * (cq * fq(i) + c0), -f * ck * fk(j))


@st.composite
def minmax_atoms(draw):
    s, t = draw(st.integers(-3, 3)), draw(st.integers(-3, 3))
    c = draw(st.integers(-2, 8))
    op = draw(st.sampled_from(sorted(RELATIONS)))
    rel, pyop = RELATIONS[op]
    which = draw(st.sampled_from(["abs", "min", "max"]))
    if which == "abs":
        return rel(sp.Abs(q - k + s), c, evaluate=False), lambda i, j: pyop(abs(i - j + s), c)
    fn, pyfn = (sp.Min, min) if which == "min" else (sp.Max, max)
    return rel(fn(q + s, k + t), c, evaluate=False), lambda i, j: pyop(pyfn(i + s, j + t), c)


def _and(kids):
    return sp.And(*(e for e, _ in kids)), lambda i, j: all(f(i, j) for _, f in kids)


def _or(kids):
    return sp.Or(*(e for e, _ in kids)), lambda i, j: any(f(i, j) for _, f in kids)


def _not(kid):
    return sp.Not(kid[0]), lambda i, j: not kid[1](i, j)


def _xor(pair):
    (a, fa), (b, fb) = pair
    return sp.Xor(a, b), lambda i, j: fa(i, j) != fb(i, j)


def _implies(pair):
    (a, fa), (b, fb) = pair
    return sp.Implies(a, b), lambda i, j: (not fa(i, j)) or fb(i, j)


def _equivalent(pair):
    (a, fa), (b, fb) = pair
    return sp.Equivalent(a, b), lambda i, j: fa(i, j) == fb(i, j)


atoms = st.one_of(linear_atoms(), linear_atoms(), minmax_atoms())
predicates = st.recursive(
    atoms,
    lambda ch: st.one_of(
        st.lists(ch, min_size=2, max_size=3).map(_and),
        st.lists(ch, min_size=2, max_size=3).map(_or),
        ch.map(_not),
        st.tuples(ch, ch).map(_xor),
        st.tuples(ch, ch).map(_implies),
        st.tuples(ch, ch).map(_equivalent),
    ),
    max_leaves=5,
)


@settings(max_examples=120)
@given(predicates, st.integers(0, 14), st.integers(0, 14))
def test_random_predicates_match_brute_force(pred, sq, sk):
    expr, fn = pred
    m = check(expr, fn, sq, sk)
    # the printed form parses back to the same mask
    assert from_predicate(str(expr), sq, sk) == m


@given(linear_atoms(), st.integers(1, 14), st.integers(1, 14))
def test_random_atoms_match_brute_force(atom, sq, sk):
    check(atom[0], atom[1], sq, sk)


# ---- fixed predicates, brute-forced from sympy itself ---------------------------------------

FIXED = [
    k <= q,
    2 * q - 2 * k >= 1,  # q - k >= 1/2, i.e. q - k >= 1 over the integers
    sp.Rational(1, 3) * q - sp.Rational(1, 3) * k < sp.Rational(1, 2),
    sp.Eq(q // 3, k // 3),
    (q // 3) >= (k // 3),  # sympy rewrites this to q/3 >= floor(k/3): still exact
    sp.Ne(q % 3, k % 4),
    sp.Eq(sp.Mod(q, 3) - sp.Mod(k, 2), 1),
    sp.Eq((q // 2) % 3, (k // 3) % 2),
    sp.Eq(q % 2, 0) & (k <= q),
    ~((q % 5) <= (k % 5)),
    (-q) // 3 + k < 2,
    sp.Ge(sp.ceiling(q * sp.Rational(2, 3)), k, evaluate=False),
    sp.Ge(q // 2, k, evaluate=False),
    sp.Mod(q, sp.Rational(3, 2)) < 1,
    sp.Abs(q - k) < 3,
    sp.Min(q, k + 2) >= 4,
    sp.Max(q, k) <= 6,
    sp.ITE(q < 5, k <= q, k >= q),
    sp.Implies(q > 3, sp.Eq(k, 2)),
    sp.Equivalent(q > 3, k > 3, q - k > 0),
    sp.Xor(q > k, k > 2, sp.Eq(q, 4)),
    sp.Eq(sp.floor((q + q // 2) / 3), k // 2),  # a floor of q and of an inner floor of q
    sp.Ge(sp.floor((5 - 2 * (q // 3)) / 4) - (q // 2), (-k) // 3, evaluate=False),
    sp.Ge(sp.Mul(q - k, sp.Pow(2, -1, evaluate=False), evaluate=False), 1, evaluate=False),
    sp.true,
    sp.false,
    sp.Eq(q, q),  # sympy: true
]


@pytest.mark.parametrize("expr", FIXED, ids=[str(e) for e in FIXED])
@pytest.mark.parametrize("shape", [(13, 11), (7, 14), (1, 1), (14, 14), (3, 1)])
def test_fixed_predicates(expr, shape):
    check(expr, None, *shape)


def test_plain_symbols_are_matched_by_name():
    Q, K = sp.Symbol("q"), sp.Symbol("k")
    assert from_predicate(K <= Q, 9) == maskc.causal(9)
    assert from_predicate((Q // 3) >= (K // 3), 10) == maskc.block_causal(10, 3)
    Qr, Kr = sp.symbols("q k", real=True, positive=True)
    assert from_predicate(sp.And(Kr <= Qr, Qr - Kr < 3), 12) == maskc.sliding_window(12, 3)


def test_more_than_16_atoms_in_one_cell():
    expr = sp.Or(*(sp.Eq(q - k, d) for d in range(-9, 10, 1)))  # 19 diagonals
    check(expr, lambda i, j: -9 <= i - j <= 9, 14, 14)
    expr = sp.Xor(*(q - k >= d for d in range(18)))
    check(expr, lambda i, j: sum(i - j >= d for d in range(18)) % 2 == 1, 14, 14)
    expr = sp.Not(sp.Or(*(sp.Eq(q - k, d) for d in range(-9, 10, 1))), evaluate=False)
    check(expr, lambda i, j: not -9 <= i - j <= 9, 14, 14)


def test_huge_coefficients_stay_exact():
    big = 10**20
    check(q - k <= 10**30, lambda i, j: True, 5, 7)
    check(
        sp.Ge((q * big + 3) // (big + 1), k // 3, evaluate=False),
        lambda i, j: (i * big + 3) // (big + 1) >= j // 3,
        12,
        10,
    )
    m = 10**19
    check(sp.Eq(sp.Mod(q * (m + 1), m), 2), lambda i, j: (i * (m + 1)) % m == 2, 12, 3)


def test_empty_domains():
    for sq, sk in [(0, 0), (0, 5), (5, 0)]:
        m = from_predicate(k <= q, sq, sk)
        assert m.shape == (sq, sk) and m.is_empty()
    assert from_predicate(k <= q, 0).shape == (0, 0)


# ---- equal to the builders ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
def test_causal_and_sliding_window(n):
    assert from_predicate(k <= q, n, n) == maskc.causal(n)
    assert from_predicate(k <= q, n) == maskc.causal(n)
    for w in (1, 3, 17, n + 5):
        assert from_predicate((k <= q) & (q - k < w), n, n) == maskc.sliding_window(n, w)
        assert from_predicate(sp.Abs(q - k) < w, n, n) == maskc.sliding_window(n, w, causal=False)


@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5), (300, 1000)])
def test_bottom_right_causal(sq, sk):
    assert from_predicate(k - q <= sk - sq, sq, sk) == maskc.causal(sq, sk)


@pytest.mark.parametrize("n,c", [(10, 3), (64, 8), (1000, 64), (4096, 1000), (5, 7)])
def test_block_causal_and_packed_documents(n, c):
    assert from_predicate((q // c) >= (k // c), n, n) == maskc.block_causal(n, c)
    assert from_predicate(f"q // {c} >= k // {c}", n) == maskc.block_causal(n, c)
    lens = [c] * (n // c) + ([n % c] if n % c else [])
    assert from_predicate(sp.Eq(q // c, k // c) & (k <= q), n, n) == maskc.varlen(lens)
    assert from_predicate(f"q // {c} == k // {c}", n) == maskc.varlen(lens, maskc.FULL)


def test_prefix_lm_and_global_tokens():
    n, p = 50, 12
    assert from_predicate((k <= q) | ((q < p) & (k < p)), n) == maskc.prefix_lm(n, p)
    g, w = 3, 5
    longformer = (sp.Abs(q - k) < w) | (q < g) | (k < g)
    assert from_predicate(longformer, n) == maskc.global_tokens(n, g, w)


def test_large_sizes_compile_exactly():
    # timings are recorded by benchmarks/bench_mask.py, not asserted here
    m = from_predicate((q // 1024) >= (k // 1024), 32768, 32768)
    assert m == maskc.block_causal(32768, 1024)
    n = 1 << 20
    m = from_predicate((k <= q) & (q - k < 4096), n, n)
    assert m == maskc.sliding_window(n, 4096)


# ---- strings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,fn",
    [
        ("k <= q", lambda i, j: j <= i),
        ("q // 3 == k // 3 and k <= q", lambda i, j: i // 3 == j // 3 and j <= i),
        ("0 <= q - k < 3", lambda i, j: 0 <= i - j < 3),
        ("q // 2 >= k", lambda i, j: i // 2 >= j),  # kept as a floor (sympy would rewrite it)
        ("q // 4 // 2 == k // 8", lambda i, j: i // 4 // 2 == j // 8),
        ("(q < k) == (k < 3)", lambda i, j: (i < j) == (j < 3)),
        ("(q < k) != (k < 3)", lambda i, j: (i < j) != (j < 3)),
        ("not q < k", lambda i, j: not i < j),
        ("abs(q - k) <= 2 or k == 0", lambda i, j: abs(i - j) <= 2 or j == 0),
        ("q % 3 != k % 3", lambda i, j: i % 3 != j % 3),
        ("Eq(q, k) | (k < 1)", lambda i, j: i == j or j < 1),
        ("q/2 - k/2 >= 1/2", lambda i, j: i - j >= 1),
        ("ceil(q/3) >= k", lambda i, j: -(-i // 3) >= j),
        ("min(q, k + 2) > 4 or max(q, k) == 3", lambda i, j: min(i, j + 2) > 4 or max(i, j) == 3),
        ("Implies(q > 3, Ge(k // 2, 2))", lambda i, j: i <= 3 or j // 2 >= 2),
        ("~(q > k) & (q % 2 == 1)", lambda i, j: i <= j and i % 2 == 1),
        ("+q - -k >= 2*k - 1", lambda i, j: i - j >= -1),
        ("True", lambda i, j: True),
        ("false", lambda i, j: False),
    ],
)
def test_strings(text, fn):
    check(text, fn, 13, 11)


# ---- rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred,match",
    [
        (q * k < 3, r"`k\*q` is not linear in q and k \(in `k\*q < 3`\).*allowed:"),
        (q**2 < 3, r"`q\*\*2` is not linear in q and k"),
        ("1/q < 3", r"`1/q` is not linear in q and k"),
        ("q * (k // 2) < 3", r"is not linear in q and k"),
        (sp.Eq(sp.floor((q + k) / 2), 3), r"`floor\(k/2 \+ q/2\)` mixes q and k inside floor"),
        ("(q + k // 2) % 3 == 1", r"mixes q and k inside floor"),
        ("q % k == 0", r"`Mod\(q, k\)`.*the modulus must be a non-zero rational constant"),
        (2 * q >= k, r"`2\*q >= k` has a boundary of slope 2 in the \(q, k\) plane.*allowed:"),
        ("q + k <= 5", r"boundary of slope -1"),
        (sp.Eq(2 * q, k), r"boundary of slope 2"),
        (q // 2 >= k, r"slope 1/2.*sympy rewrites `floor\(q/2\) >= k`"),
        (sp.Min(q, 2 * k) > 3, r"`Min\(2\*k, q\)` has a boundary of slope 1/2"),
        (q + k, r"`k \+ q` is not a boolean expression \(a sympy expression of type Add\)"),
        (q, r"`q` is not a boolean expression"),
        (5, r"pred must be a sympy boolean expression in q and k or a string, got int"),
        (None, r"pred must be a sympy boolean expression.*got NoneType"),
        (q == k, r"got the Python bool False; `a == b` on sympy expressions compares them"),
        (True, r"got the Python bool True"),
        (sp.Symbol("x") < q, r"unknown symbol `x` in `x < q`; only q \(query position\) and k"),
        ("x < q", r"unknown symbol `x` in 'x < q'; only q"),
        (q < 0.5, r"floating-point constant `0.50*` in `q < 0.5` cannot be used exactly"),
        ("q < 0.5", r"floating-point constant 0.5 in 'q < 0.5' cannot be used exactly"),
        (q < sp.pi, r"`pi` in `q < pi` is not an exact rational constant"),
        ("q +", r"cannot parse 'q \+': "),
        ("q.real < 3", r"unsupported syntax `q.real`"),
        ("[q] < 3", r"unsupported syntax `\[q\]`"),
        ("q % 0 == 1", r"cannot evaluate 'q % 0 == 1': ZeroDivisionError"),
        ("q < k + (k < 2)", r"cannot evaluate"),
        (sp.Eq(q, k < 2), r"`k < 2` is a boolean used as a number"),
        (sp.Eq(sp.sin(q), 0), r"`sin\(q\)` \(sin\) in `Eq\(sin\(q\), 0\)` is not allowed"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_rejections(pred, match):
    with pytest.raises(MaskError, match=match):
        from_predicate(pred, 8, 8)


def test_rejects_bad_sizes():
    with pytest.raises(MaskError, match=r"sq must be >= 0"):
        from_predicate(k <= q, -1)
    with pytest.raises(MaskError, match=r"sk must be an integer"):
        from_predicate(k <= q, 4, 2.5)


def test_grid_limits():
    n = 1 << 24
    with pytest.raises(MaskError, match=r"more than 4000000 positions of q \(sq = 16777216\)"):
        from_predicate(sp.Eq(q % 3, 0), n, 8)
    with pytest.raises(MaskError, match=r"= 4194304 cells \(MAX_CELLS = 4000000\)"):
        from_predicate(sp.Eq(q // 4, k // 4), 8192, 8192)
    with pytest.raises(MaskError, match=r"cells of the floor / // / % grid have a boundary inside"):
        from_predicate(sp.Eq(q % 2, 0), 1 << 20, 8)  # 524288 two-row cells, one row each


# ---- internals -------------------------------------------------------------------------------


@given(
    st.integers(-7, 7).filter(bool),
    st.integers(-20, 20),
    st.integers(1, 6),
    st.integers(0, 30),
    st.integers(0, 30),
)
def test_floor_breakpoints_are_exact(a, c, d, p0, length):
    p1 = p0 + length
    got = P._floor_breaks(a, c, d, p0, p1, P._Budget("q", p1))
    x = np.arange(p0, p1)
    vals = (a * x + c) // d
    want = x[1:][np.diff(vals) != 0]
    assert sorted(got.tolist()) == want.tolist()
