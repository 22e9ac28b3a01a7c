"""Compile a predicate over query position ``q`` and key position ``k`` into an exact `Mask`.

``from_predicate(pred, sq, sk)`` returns exactly ``{(i, j) in [0,sq) x [0,sk) : pred(i, j)}``
or raises `MaskError` naming the sub-expression it cannot compile; it never approximates.
``pred`` is a sympy boolean expression in symbols named ``q`` and ``k`` (any assumptions), or a
string such as ``"(q // 256 >= k // 256) and q - k < 1024"`` (parsed with Python's `ast` into
sympy, no ``eval``; ``==``/``!=``, ``and``/``or``/``not`` and chained comparisons work).

Method
------
1. **Front end.** The sympy tree becomes a small boolean tree of ``and / or / xor / not / const /
   atom`` nodes. An atom is ``qc*q + kc*k + sum(c_f * f)  (<= | ==)  bound`` with integer
   coefficients; each ``f`` is a *floor term* ``floor((a*x + sum(b_g * g) + c) / d)`` of ONE
   position ``x`` (``g``: inner floor terms of the same ``x``: ``q // 4 // 2``, ``(q//4) % 2``).
   ``e // c`` is ``floor(e / c)``, ``ceiling(e) = -floor(-e)``, ``Mod(e, m) = e - m*floor(e/m)``.
   Rational coefficients are scaled away exactly, strict relations become non-strict over the
   integers (``S < 1/2`` is ``S <= 0``), ``!=`` is ``not ==``, and ``Min``/``Max``/``Abs`` become
   case splits guarded by atoms. All checks happen here: non-linear terms, floors mixing q and k,
   floats, unknown symbols, and boundaries whose slope is not 0, 1 or vertical (``qc`` and ``kc``
   both non-zero with ``qc != -kc``; slices can only follow rows, columns and ``k - q = c``).
   Strings build their relations unevaluated, so ``"q // 2 >= k"`` stays a floor staircase;
   sympy itself rewrites ``floor(q/2) >= k`` on integer symbols into ``q/2 >= k`` (slope 1/2,
   rejected, and the message says so).
2. **Grid.** A floor term is piecewise constant in its position; its breakpoints are found in
   exact integer arithmetic. The breakpoints in q and in k cut ``[0,sq) x [0,sk)`` into a grid of
   cells on each of which every floor term is a constant (at most `MAX_CELLS` cells).
3. **Classify cells (vectorised).** With the floor terms constant, each atom is on a cell a row
   bound, a column bound, a diagonal ``k - q (<= | >= | ==) d`` or a constant, so numpy decides
   per cell whether it holds everywhere, nowhere or depends on (i, j). A three-valued
   (Kleene) evaluation of the boolean tree then marks each cell full, empty or partial.
4. **Partial cells** (at most `MAX_REGIONS`). Constants are folded through the tree; the rest
   is evaluated by one `normalize.sweep` over the cell's distinct atoms (what `maskc.combine`
   does) in local coordinates, cached by (cell shape, reduced tree): periodic patterns compile
   once.
5. **Assembly.** Runs of full cells and partial-cell bands are stitched row band by row band into
   one canonical band list (`normalize.Canon`), merging intervals that touch across cell borders.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from . import normalize as nz
from .errors import MaskError
from .kinds import as_int
from .mask import Mask

MAX_CELLS = 4_000_000  # grid cells (floor terms constant on each), classified vectorised
MAX_REGIONS = 200_000  # cells with a boundary inside, each compiled by a sweep

ALLOWED = (
    "allowed: comparisons (<, <=, >, >=, Eq or ==, Ne or !=) of linear expressions in q and k with "
    "rational coefficients whose boundary is a row (q = c), a column (k = c) or a slope-1 diagonal "
    "(k - q = c); floor(e/c) or e // c, ceiling(e/c), Mod(e, c) or e % c where e is linear in ONE "
    "of q, k and c is a rational constant; Min, Max, Abs of such terms; combined with And, Or, "
    "Not, Xor, Implies, Equivalent, ITE (& | ~ ^) and true/false"
)

TRUE = ("const", True)
FALSE = ("const", False)


def _fail(message: str):
    raise MaskError(f"from_predicate: {message}")


# ---- boolean tree -------------------------------------------------------------------------
# nodes: ("const", bool) | ("atom", id) | ("spec", spec) | ("not", node)
#        | ("and" | "or" | "xor", (node, ...))


def _mk_not(node):
    if node[0] == "const":
        return FALSE if node[1] else TRUE
    if node[0] == "not":
        return node[1]
    return ("not", node)


def _mk_nary(tag: str, kids) -> tuple:
    """``and`` / ``or`` of `kids`, flattened, with constants folded."""
    absorb = tag == "or"  # the constant that decides the result
    out = []
    for c in kids:
        if c[0] == "const":
            if c[1] == absorb:
                return c
            continue
        if c[0] == tag:
            out.extend(c[1])
        else:
            out.append(c)
    if not out:
        return ("const", not absorb)
    if len(out) == 1:
        return out[0]
    return (tag, tuple(out))


def _mk_xor(kids) -> tuple:
    parity = False
    out = []
    for c in kids:
        if c[0] == "const":
            parity ^= c[1]
        else:
            out.append(c)
    if not out:
        return ("const", parity)
    node = out[0] if len(out) == 1 else ("xor", tuple(out))
    return _mk_not(node) if parity else node


# ---- linear forms --------------------------------------------------------------------------


class _Lin:
    """``sum(coef[v] * v) + const`` over v in {"q", "k", floor-term ids}, exact rationals."""

    __slots__ = ("coef", "const")

    def __init__(self, coef=None, const=0):
        self.coef = {v: Fraction(c) for v, c in (coef or {}).items() if c}
        self.const = Fraction(const)

    def __add__(self, other: "_Lin") -> "_Lin":
        coef = dict(self.coef)
        for v, c in other.coef.items():
            coef[v] = coef.get(v, 0) + c
        return _Lin(coef, self.const + other.const)

    def scale(self, f) -> "_Lin":
        f = Fraction(f)
        return _Lin({v: c * f for v, c in self.coef.items()}, self.const * f)

    def __neg__(self) -> "_Lin":
        return self.scale(-1)

    def __sub__(self, other: "_Lin") -> "_Lin":
        return self + (-other)

    def is_const(self) -> bool:
        return not self.coef


def _lcm_of_denominators(values) -> int:
    m = 1
    for x in values:
        m = math.lcm(m, Fraction(x).denominator)
    return m


@dataclass(frozen=True)
class _Floor:
    """``floor((a*x + sum(b * value(g) for g, b in inner) + c) / d)``, x = position `var`, d > 0."""

    var: str
    a: int
    inner: tuple  # ((term id, b), ...)
    c: int
    d: int


@dataclass(frozen=True)
class _Atom:
    """``qc*q + kc*k + sum(coef * value(f) for f, coef in terms)  op  bound``; op '<=' or '=='."""

    qc: int
    kc: int
    terms: tuple  # ((term id, coef), ...)
    op: str
    bound: int


# ---- front end: sympy -> boolean tree of atoms --------------------------------------------


class _Front:
    """Walks a sympy expression; collects floor terms and atoms (both deduplicated)."""

    def __init__(self, sp):
        self.sp = sp
        self.terms: list[_Floor] = []
        self.term_ids: dict[_Floor, int] = {}
        self.atoms: list[_Atom] = []
        self.atom_ids: dict[_Atom, int] = {}

    # boolean level

    def boolean(self, e) -> tuple:
        sp = self.sp
        ba = sp.logic.boolalg
        if isinstance(e, bool):
            _fail(
                f"got the Python bool {e}; `a == b` on sympy expressions compares them "
                "structurally and gives a bool. Use sympy.Eq(a, b) / sympy.Ne(a, b), or a string "
                "such as 'q // 4 == k // 4'"
            )
        if not isinstance(e, sp.Basic):
            _fail(
                f"pred must be a sympy boolean expression in q and k or a string, got "
                f"{type(e).__name__} {e!r}; {ALLOWED}"
            )
        if isinstance(e, ba.BooleanTrue):
            return TRUE
        if isinstance(e, ba.BooleanFalse):
            return FALSE
        if isinstance(e, sp.And):
            return _mk_nary("and", [self.boolean(a) for a in e.args])
        if isinstance(e, sp.Or):
            return _mk_nary("or", [self.boolean(a) for a in e.args])
        if isinstance(e, sp.Not):
            return _mk_not(self.boolean(e.args[0]))
        if isinstance(e, sp.Xor):
            return _mk_xor([self.boolean(a) for a in e.args])
        if isinstance(e, sp.Implies):
            a, b = (self.boolean(x) for x in e.args)
            return _mk_nary("or", [_mk_not(a), b])
        if isinstance(e, sp.Equivalent):
            kids = [self.boolean(a) for a in e.args]
            both = _mk_nary("and", kids)
            neither = _mk_nary("and", [_mk_not(x) for x in kids])
            return _mk_nary("or", [both, neither])
        if isinstance(e, sp.ITE):
            c, a, b = (self.boolean(x) for x in e.args)
            return _mk_nary("or", [_mk_nary("and", [c, a]), _mk_nary("and", [_mk_not(c), b])])
        if isinstance(e, sp.core.relational.Relational):
            return self.relation(e)
        what = "expression" if isinstance(e, sp.Expr) else "object"
        _fail(
            f"`{e}` is not a boolean expression (a sympy {what} of type {type(e).__name__}); "
            + ALLOWED
        )

    def relation(self, e) -> tuple:
        op = e.rel_op
        if op not in ("<", "<=", ">", ">=", "==", "!="):
            _fail(f"relation `{e}` with operator {op!r} is not supported; {ALLOWED}")
        out = []
        for gl, lhs in self.linear(e.lhs, e):
            for gr, rhs in self.linear(e.rhs, e):
                out.append(_mk_nary("and", [gl, gr, self.atom(lhs - rhs, op, e)]))
        return _mk_nary("or", out)

    # arithmetic level: a list of (guard node, _Lin) cases covering every (q, k)

    def linear(self, x, ctx) -> list:
        sp = self.sp
        if isinstance(x, sp.Symbol):
            if x.name in ("q", "k"):
                return [(TRUE, _Lin({x.name: 1}))]
            _fail(
                f"unknown symbol `{x}` in `{ctx}`; only q (query position) and k (key position) "
                "may appear"
            )
        if isinstance(x, sp.Rational):
            return [(TRUE, _Lin(const=Fraction(int(x.p), int(x.q))))]
        if isinstance(x, sp.Float):
            _fail(
                f"floating-point constant `{x}` in `{ctx}` cannot be used exactly; write a "
                "rational (sympy.Rational(1, 2), or 1/2 in a string)"
            )
        if isinstance(x, sp.Add):
            return self._fold(x.args, ctx, lambda a, b: a + b)
        if isinstance(x, sp.Mul):
            return self._fold(x.args, ctx, lambda a, b: self._mul(a, b, x, ctx))
        if isinstance(x, sp.Pow):
            return self._pow(x, ctx)
        if isinstance(x, sp.floor):
            return [(g, self.floor_of(L, x)) for g, L in self.linear(x.args[0], ctx)]
        if isinstance(x, sp.ceiling):
            return [(g, -self.floor_of(-L, x)) for g, L in self.linear(x.args[0], ctx)]
        if isinstance(x, sp.Mod):
            return self._mod(x, ctx)
        if isinstance(x, (sp.Min, sp.Max)):
            cases = self.linear(x.args[0], ctx)
            for arg in x.args[1:]:
                cases = self._minmax(cases, self.linear(arg, ctx), isinstance(x, sp.Max), x)
            return cases
        if isinstance(x, sp.Abs):
            return self._abs(x, ctx)
        if isinstance(x, (sp.Number, sp.NumberSymbol)):
            _fail(f"`{x}` in `{ctx}` is not an exact rational constant; {ALLOWED}")
        if isinstance(x, sp.logic.boolalg.Boolean):
            _fail(f"`{x}` is a boolean used as a number in `{ctx}`; {ALLOWED}")
        _fail(f"`{x}` ({type(x).__name__}) in `{ctx}` is not allowed; {ALLOWED}")

    def _fold(self, args, ctx, combine) -> list:
        cases = None
        for arg in args:
            nxt = self.linear(arg, ctx)
            if cases is None:
                cases = nxt
                continue
            cases = [
                (_mk_nary("and", [ga, gb]), combine(La, Lb)) for ga, La in cases for gb, Lb in nxt
            ]
            cases = [(g, L) for g, L in cases if g != FALSE]
        return cases

    def _nonlinear(self, x, ctx):
        _fail(f"`{x}` is not linear in q and k (in `{ctx}`); {ALLOWED}")

    def _mul(self, a: _Lin, b: _Lin, x, ctx) -> _Lin:
        if a.is_const():
            return b.scale(a.const)
        if b.is_const():
            return a.scale(b.const)
        self._nonlinear(x, ctx)

    def _pow(self, x, ctx) -> list:
        exp = x.exp
        if not isinstance(exp, self.sp.Integer):
            self._nonlinear(x, ctx)
        out = []
        for g, L in self.linear(x.base, ctx):
            if not L.is_const():
                self._nonlinear(x, ctx)
            if L.const == 0 and int(exp) < 0:
                _fail(f"`{x}` in `{ctx}` divides by zero")
            out.append((g, _Lin(const=L.const ** int(exp))))
        return out

    def _mod(self, x, ctx) -> list:
        arg, mod = x.args
        mods = self.linear(mod, ctx)
        if len(mods) != 1 or not mods[0][1].is_const() or mods[0][1].const == 0:
            _fail(f"`{x}` in `{ctx}`: the modulus must be a non-zero rational constant; {ALLOWED}")
        m = mods[0][1].const
        return [
            (g, L - self.floor_of(L.scale(1 / m), x).scale(m)) for g, L in self.linear(arg, ctx)
        ]

    def _minmax(self, left, right, is_max: bool, source) -> list:
        out = []
        for ga, La in left:
            for gb, Lb in right:
                base = _mk_nary("and", [ga, gb])
                left_wins = self.atom(La - Lb, ">=" if is_max else "<=", source)
                out.append((_mk_nary("and", [base, left_wins]), La))
                out.append((_mk_nary("and", [base, _mk_not(left_wins)]), Lb))
        return [(g, L) for g, L in out if g != FALSE]

    def _abs(self, x, ctx) -> list:
        out = []
        for g, L in self.linear(x.args[0], ctx):
            nonneg = self.atom(L, ">=", x)
            out.append((_mk_nary("and", [g, nonneg]), L))
            out.append((_mk_nary("and", [g, _mk_not(nonneg)]), -L))
        return [(g, L) for g, L in out if g != FALSE]

    # floor terms and atoms

    def floor_of(self, L: _Lin, source) -> _Lin:
        """``floor(L)`` as a linear form over a (new or shared) floor term."""
        if L.is_const():
            return _Lin(const=math.floor(L.const))
        positions = {v if isinstance(v, str) else self.terms[v].var for v in L.coef}
        if len(positions) > 1:
            _fail(
                f"`{source}` mixes q and k inside floor / // / %; their argument must depend on "
                f"only one of q, k; {ALLOWED}"
            )
        var = positions.pop()
        den = _lcm_of_denominators([*L.coef.values(), L.const])
        a = int(L.coef.get(var, 0) * den)
        inner = sorted((v, int(c * den)) for v, c in L.coef.items() if not isinstance(v, str))
        c = int(L.const * den)
        if a % den == 0 and all(b % den == 0 for _, b in inner):
            # integer coefficients: floor((X + c) / d) = X / d + floor(c / d)
            coef = {v: b // den for v, b in inner}
            coef[var] = a // den
            return _Lin(coef, c // den)
        g = math.gcd(a, den, *(b for _, b in inner))
        # floor((g*X + c) / (g*d')) = floor((X + floor(c/g)) / d') for integer X
        a, den, c = a // g, den // g, c // g
        inner = tuple((v, b // g) for v, b in inner)
        term = _Floor(var, a, inner, c % den, den)
        tid = self.term_ids.get(term)
        if tid is None:
            tid = self.term_ids[term] = len(self.terms)
            self.terms.append(term)
        return _Lin({tid: 1}, c // den)

    def atom(self, L: _Lin, op: str, source) -> tuple:
        """The node for ``L op 0``: a constant or a deduplicated integer atom."""
        if op in (">", ">="):
            L, op = -L, {">": "<", ">=": "<="}[op]
        if op == "!=":
            return _mk_not(self.atom(L, "==", source))
        if L.is_const():
            value = {"<": L.const < 0, "<=": L.const <= 0, "==": L.const == 0}[op]
            return TRUE if value else FALSE
        m = _lcm_of_denominators(L.coef.values())
        ints = {v: int(c * m) for v, c in L.coef.items()}
        g = math.gcd(*ints.values())
        ints = {v: c // g for v, c in ints.items()}
        rest = -L.const * m / g  # integer-valued sum  op  rest
        if op == "<":
            op, bound = "<=", math.ceil(rest) - 1
        elif op == "<=":
            bound = math.floor(rest)
        else:
            if rest.denominator != 1:
                return FALSE
            bound = int(rest)
        qc = ints.pop("q", 0)
        kc = ints.pop("k", 0)
        if qc and kc and qc != -kc:
            _fail(
                f"`{source}` has a boundary of slope {Fraction(-qc, kc)} in the (q, k) plane; "
                "mask slices can only follow rows (q = c), columns (k = c) and slope-1 diagonals "
                f"(k - q = c), so it cannot be compiled exactly; {ALLOWED}. Note: with integer "
                "symbols sympy rewrites `floor(q/2) >= k` into `q/2 >= k`; to keep such a floor "
                "staircase, pass the predicate as a string or use plain sympy.Symbol('q')"
            )
        terms = tuple(sorted(ints.items()))
        if op == "==":
            first = next(c for c in (qc, kc, *(c for _, c in terms)) if c)
            if first < 0:
                qc, kc, bound = -qc, -kc, -bound
                terms = tuple((v, -c) for v, c in terms)
        atom = _Atom(qc, kc, terms, op, bound)
        aid = self.atom_ids.get(atom)
        if aid is None:
            aid = self.atom_ids[atom] = len(self.atoms)
            self.atoms.append(atom)
        return ("atom", aid)


# ---- strings -----------------------------------------------------------------------------

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}
_FUNCS = {
    "floor": "floor", "ceiling": "ceiling", "ceil": "ceiling", "Mod": "Mod", "Min": "Min",
    "min": "Min", "Max": "Max", "max": "Max", "Abs": "Abs", "abs": "Abs", "Eq": "Eq", "Ne": "Ne",
    "Lt": "Lt", "Le": "Le", "Gt": "Gt", "Ge": "Ge", "And": "And", "Or": "Or", "Not": "Not",
    "Xor": "Xor", "Implies": "Implies", "Equivalent": "Equivalent", "ITE": "ITE",
}  # fmt: skip
_COMPARE = {ast.Eq: "Eq", ast.NotEq: "Ne", ast.Lt: "Lt", ast.LtE: "Le", ast.Gt: "Gt", ast.GtE: "Ge"}


def _compare(sp, op, a, b):
    """``a op b`` unevaluated, so sympy keeps floors as written (it would turn ``floor(q/2) >= k``
    into ``q/2 >= k``); ``==`` / ``!=`` between conditions mean Equivalent / Xor."""
    boolean = sp.logic.boolalg.Boolean
    if isinstance(op, (ast.Eq, ast.NotEq)) and all(
        isinstance(x, boolean) and not isinstance(x, sp.Symbol) for x in (a, b)
    ):
        return sp.Equivalent(a, b) if isinstance(op, ast.Eq) else sp.Xor(a, b)
    return getattr(sp, _COMPARE[type(op)])(a, b, evaluate=False)


def _parse_string(text: str, sp):
    """A sympy expression from `text`, built node by node from Python's AST (no eval)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        _fail(f"cannot parse {text!r}: {e.msg}")
    names = {
        "q": sp.Symbol("q", integer=True),
        "k": sp.Symbol("k", integer=True),
        "true": sp.true, "True": sp.true, "false": sp.false, "False": sp.false,
    }  # fmt: skip

    def ev(node):
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                return sp.true if node.value else sp.false
            if isinstance(node.value, int):
                return sp.Integer(node.value)
            if isinstance(node.value, float):
                _fail(
                    f"floating-point constant {node.value!r} in {text!r} cannot be used exactly; "
                    "write a rational such as 1/2"
                )
        elif isinstance(node, ast.Name):
            if node.id in names:
                return names[node.id]
            _fail(
                f"unknown symbol `{node.id}` in {text!r}; only q (query position) and k "
                "(key position) may appear"
            )
        elif isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            if isinstance(node.op, ast.USub):
                return -v
            if isinstance(node.op, ast.UAdd):
                return v
            return sp.Not(v)  # `not` and `~`
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        elif isinstance(node, ast.BoolOp):
            return (sp.And if isinstance(node.op, ast.And) else sp.Or)(*map(ev, node.values))
        elif isinstance(node, ast.Compare) and all(type(o) in _COMPARE for o in node.ops):
            parts = [ev(node.left), *map(ev, node.comparators)]
            return sp.And(*(_compare(sp, o, a, b) for o, a, b in zip(node.ops, parts, parts[1:])))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS
            and not node.keywords
        ):
            name = _FUNCS[node.func.id]
            if name in _COMPARE.values():  # unevaluated, like the operators
                return getattr(sp, name)(*map(ev, node.args), evaluate=False)
            return getattr(sp, name)(*map(ev, node.args))
        _fail(f"unsupported syntax `{ast.unparse(node)}` in {text!r}; {ALLOWED}")

    try:
        return ev(tree.body)
    except MaskError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
        _fail(f"cannot evaluate {text!r}: {type(e).__name__}: {e}")


# ---- the grid of cells -------------------------------------------------------------------
# Exact integer arithmetic throughout: int64 numpy arrays where a magnitude bound proves they
# cannot overflow, Python ints (object arrays) otherwise.

_SAFE = 1 << 60


class _Budget:
    """Counts breakpoints of one position so a huge grid fails before it is built."""

    def __init__(self, var: str, n: int):
        self.var, self.n, self.left = var, n, MAX_CELLS

    def charge(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            size = "sq" if self.var == "q" else "sk"
            _fail(
                f"the floor / // / % terms change value at more than {MAX_CELLS} positions of "
                f"{self.var} ({size} = {self.n}); that many cells are refused "
                f"(MAX_CELLS = {MAX_CELLS}). Use coarser divisors, or build the mask with "
                "builders and algebra"
            )


def _ints(values, big: bool) -> np.ndarray:
    return np.array(list(values), dtype=object) if big else np.asarray(values, dtype=np.int64)


def _floor_breaks(a: int, c: int, d: int, p0: int, p1: int, budget: _Budget) -> np.ndarray:
    """x in (p0, p1) where floor((a*x + c) / d) differs from its value at x - 1."""
    if p1 - p0 < 2:
        return np.zeros(0, dtype=np.int64)
    if abs(a) >= d:  # the numerator moves by at least d per step: every x
        budget.charge(p1 - p0 - 1)
        return np.arange(p0 + 1, p1, dtype=np.int64)
    if a > 0:  # a multiple m*d in (a*(x-1) + c, a*x + c]
        m_lo, m_hi = (a * p0 + c) // d + 1, (a * (p1 - 1) + c) // d
    else:  # a multiple m*d in (a*x + c, a*(x-1) + c]
        m_lo, m_hi = (a * (p1 - 1) + c) // d + 1, (a * p0 + c) // d
    budget.charge(max(0, m_hi - m_lo + 1))
    big = max(abs(m_lo), abs(m_hi)) * d + abs(c) >= _SAFE
    m = _ints(range(m_lo, m_hi + 1), big)
    x = -((c - m * d) // a) if a > 0 else (c - m * d) // -a + 1
    return x.astype(np.int64)


def _value(terms: list[_Floor], tid: int, x: int) -> int:
    t = terms[tid]
    return (t.a * x + sum(b * _value(terms, g, x) for g, b in t.inner) + t.c) // t.d


def _term_breaks(terms, tid: int, n: int, memo: dict, budget: _Budget) -> np.ndarray:
    """Positions in (0, n) where floor term `tid` may change value (a superset is harmless)."""
    if tid in memo:
        return memo[tid]
    t = terms[tid]
    parts = [_term_breaks(terms, g, n, memo, budget) for g, _ in t.inner]
    inner = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    parts = [inner]
    if t.a:
        edges = [0, *inner.tolist(), n]
        for p0, p1 in zip(edges[:-1], edges[1:]):
            c = t.c + sum(b * _value(terms, g, p0) for g, b in t.inner)
            parts.append(_floor_breaks(t.a, c, t.d, p0, p1, budget))
    out = memo[tid] = np.unique(np.concatenate(parts))
    return out


def _cuts(terms: list[_Floor], var: str, n: int) -> np.ndarray:
    """Sorted cut points 0 = c_0 < ... < c_m = n; every `var` floor term is constant between."""
    memo: dict = {}
    budget = _Budget(var, n)
    parts = [np.array([0, n], dtype=np.int64)]
    parts += [_term_breaks(terms, g, n, memo, budget) for g, t in enumerate(terms) if t.var == var]
    points = np.unique(np.concatenate(parts))
    return points[(points >= 0) & (points <= n)]


def _magnitudes(terms: list[_Floor], n: dict) -> tuple[list[int], int]:
    """Upper bounds on |value| of each floor term over [0, n), and on every numerator."""
    mags: list[int] = []
    worst = 0
    for t in terms:
        num = abs(t.a) * n[t.var] + sum(abs(b) * mags[g] for g, b in t.inner) + abs(t.c) + t.d
        worst = max(worst, num)
        mags.append(num // t.d + 1)
    return mags, worst


def _offsets(front: _Front, var: str, cuts: np.ndarray, big: bool) -> np.ndarray:
    """[cells, atoms]: per cell of `cuts`, the sum of each atom's `var` floor terms there."""
    xs = cuts[:-1].astype(object) if big else cuts[:-1]
    memo: dict = {}

    def values(g):
        if g not in memo:
            t = front.terms[g]
            num = t.a * xs + t.c
            for h, b in t.inner:
                num = num + b * values(h)
            memo[g] = num // t.d
        return memo[g]

    out = np.zeros((len(xs), len(front.atoms)), dtype=object if big else np.int64)
    for n, atom in enumerate(front.atoms):
        for g, c in atom.terms:
            if front.terms[g].var == var:
                out[:, n] += c * values(g)
    return out


def _range_state(a, b, lo, hi, op: str):
    """(always, never) of ``a*v <= b`` / ``a*v == b`` for integer v in [lo, hi], per cell."""
    if op == "==":
        hit = (b % a == 0) & (lo <= b // a) & (b // a <= hi)
        return hit & (lo == hi), ~hit
    if a > 0:  # v <= floor(b / a)
        m = b // a
        return m >= hi, m < lo
    m = -(-b // a)  # v >= ceil(b / a)
    return m <= lo, m > hi


def _atom_state(atom: _Atom, b, r0, r1, c0, c1):
    """(always, never) bool arrays of one atom over the cells; b = its bound per cell."""
    qc, kc = atom.qc, atom.kc
    if not qc and not kc:
        t = np.asarray((b >= 0) if atom.op == "<=" else (b == 0), dtype=bool)
        return t, ~t
    if not kc:
        t, f = _range_state(qc, b, r0, r1 - 1, atom.op)
    elif not qc:
        t, f = _range_state(kc, b, c0, c1 - 1, atom.op)
    else:  # kc * (k - q) with k - q in [c0 - (r1 - 1), (c1 - 1) - r0]
        t, f = _range_state(kc, b, c0 - (r1 - 1), (c1 - 1) - r0, atom.op)
    return np.asarray(t, dtype=bool), np.asarray(f, dtype=bool)


def _kleene(node: tuple, states: list, shape: tuple):
    """(always, never) of `node` per cell, three-valued: neither means 'depends on (i, j)'."""
    tag = node[0]
    if tag == "const":
        t = np.full(shape, node[1])
        return t, ~t
    if tag == "atom":
        return states[node[1]]
    if tag == "not":
        t, f = _kleene(node[1], states, shape)
        return f, t
    kids = [_kleene(c, states, shape) for c in node[1]]
    ts = [t for t, _ in kids]
    fs = [f for _, f in kids]
    if tag == "and":
        return functools.reduce(np.logical_and, ts), functools.reduce(np.logical_or, fs)
    if tag == "or":
        return functools.reduce(np.logical_or, ts), functools.reduce(np.logical_and, fs)
    known = functools.reduce(np.logical_and, [t | f for t, f in kids])
    parity = functools.reduce(np.logical_xor, ts)
    return known & parity, known & ~parity


@dataclass
class _Grid:
    """The cells: rows [Q[t], Q[t+1]) x columns [K[u], K[u+1]); floor terms constant on each."""

    Q: np.ndarray
    K: np.ndarray
    q_off: np.ndarray  # [row bands, atoms]
    k_off: np.ndarray  # [column cells, atoms]
    full: np.ndarray  # [row bands, column cells] bool: the predicate holds on the whole cell
    partial: np.ndarray  # bool: it depends on (i, j) inside the cell


def _grid(front: _Front, root: tuple, sq: int, sk: int) -> _Grid:
    Q = _cuts(front.terms, "q", sq)
    K = _cuts(front.terms, "k", sk)
    shape = (len(Q) - 1, len(K) - 1)
    if shape[0] * shape[1] > MAX_CELLS:
        _fail(
            f"the floor / // / % terms cut the {sq} x {sk} domain into {shape[0]} x {shape[1]} "
            f"= {shape[0] * shape[1]} cells (MAX_CELLS = {MAX_CELLS}); use coarser divisors, or "
            "build the mask with builders and algebra"
        )
    mags, worst = _magnitudes(front.terms, {"q": sq, "k": sk})
    for a in front.atoms:
        size = abs(a.bound) + sum(abs(c) * mags[g] for g, c in a.terms) + abs(a.qc) + abs(a.kc)
        worst = max(worst, size)
    big = max(worst, sq, sk) * 4 >= _SAFE  # int64 cannot overflow below this
    q_off = _offsets(front, "q", Q, big)
    k_off = _offsets(front, "k", K, big)
    Qv = Q.astype(object) if big else Q
    Kv = K.astype(object) if big else K
    r0, r1 = Qv[:-1, None], Qv[1:, None]
    c0, c1 = Kv[None, :-1], Kv[None, 1:]
    states = [
        _atom_state(a, a.bound - q_off[:, n][:, None] - k_off[:, n][None, :], r0, r1, c0, c1)
        for n, a in enumerate(front.atoms)
    ]
    t, f = _kleene(root, states, shape)
    full = np.broadcast_to(t, shape).astype(bool)
    partial = ~(full | np.broadcast_to(f, shape).astype(bool))
    return _Grid(Q, K, q_off, k_off, full, partial)


# ---- one region --------------------------------------------------------------------------


def _span(axis: str, a: int, b: int, op: str, n: int) -> tuple:
    """Positions 0 <= x < n with ``a*x <= b`` / ``a*x == b`` (a != 0) as a node."""
    if op == "==":
        if b % a:
            return FALSE
        lo = b // a
        hi = lo + 1
    elif a > 0:
        lo, hi = 0, b // a + 1
    else:
        lo, hi = -(-b // a), n  # x >= ceil(b / a)
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return FALSE
    if lo == 0 and hi == n:
        return TRUE
    return ("spec", (axis, lo, hi))


def _diag(a: int, b: int, op: str, h: int, w: int) -> tuple:
    """Pairs of [0,h) x [0,w) with ``a*(j - i) <= b`` / ``== b`` (a != 0) as a node."""
    lo, hi = -(h - 1), w - 1  # the range of j - i
    if op == "==":
        if b % a:
            return FALSE
        d = b // a
        if d < lo or d > hi:
            return FALSE
        return TRUE if lo == hi else ("spec", ("eq", d))
    if a > 0:
        d = b // a  # j - i <= d
        return TRUE if d >= hi else FALSE if d < lo else ("spec", ("le", d))
    d = -(-b // a)  # j - i >= ceil(b / a)
    return TRUE if d <= lo else FALSE if d > hi else ("spec", ("ge", d))


def _local(atom: _Atom, b: int, r0: int, c0: int, h: int, w: int) -> tuple:
    """Atom ``qc*q + kc*k (op) b`` on the rectangle at (r0, c0) of shape h x w, local coords."""
    qc, kc, op = atom.qc, atom.kc, atom.op
    if not kc:
        if not qc:
            return TRUE if (0 <= b if op == "<=" else b == 0) else FALSE
        return _span("r", qc, b - qc * r0, op, h)
    if not qc:
        return _span("c", kc, b - kc * c0, op, w)
    return _diag(kc, b - kc * (c0 - r0), op, h, w)  # qc = -kc: kc * (k - q)


def _reduce(node: tuple, status: list) -> tuple:
    """`node` with atoms replaced by their status in one region, constants folded."""
    tag = node[0]
    if tag == "atom":
        return status[node[1]]
    if tag == "const":
        return node
    if tag == "not":
        return _mk_not(_reduce(node[1], status))
    if tag == "xor":
        return _mk_xor([_reduce(c, status) for c in node[1]])
    absorb = tag == "or"
    kids = []
    for c in node[1]:
        r = _reduce(c, status)
        if r[0] == "const":
            if r[1] == absorb:
                return r
            continue
        kids.append(r)
    return _mk_nary(tag, kids)


def _spec_band(spec: tuple, h: int, w: int) -> np.ndarray:
    tag = spec[0]
    if tag == "r":
        row = (spec[1], spec[2], 0, 0, w, 0)
    elif tag == "c":
        row = (0, h, spec[1], 0, spec[2], 0)
    elif tag == "le":  # j <= i + d
        row = (0, h, 0, 0, spec[1] + 1, 1)
    elif tag == "ge":  # j >= i + d
        row = (0, h, spec[1], 1, w, 0)
    else:  # j == i + d
        row = (0, h, spec[1], 1, spec[1] + 1, 1)
    return np.array([row], dtype=np.int64)


def _specs_of(node: tuple, index: dict) -> dict:
    if node[0] == "spec":
        index.setdefault(node[1], len(index))
    elif node[0] == "not":
        _specs_of(node[1], index)
    else:
        for c in node[1]:
            _specs_of(c, index)
    return index


def _truth_table(node: tuple, index: dict) -> list[bool]:
    bits = np.arange(1 << len(index), dtype=np.int64)

    def ev(nd):
        if nd[0] == "spec":
            return ((bits >> index[nd[1]]) & 1).astype(bool)
        if nd[0] == "not":
            return ~ev(nd[1])
        vals = [ev(c) for c in nd[1]]
        reduce = {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[nd[0]]
        return reduce.reduce(vals)

    return ev(node).tolist()


_OP_TABLES = {
    "and": lambda n: [bits == (1 << n) - 1 for bits in range(1 << n)],
    "or": lambda n: [bits != 0 for bits in range(1 << n)],
    "xor": lambda n: [bin(bits).count("1") % 2 == 1 for bits in range(1 << n)],
}


def _node_bands(node: tuple, h: int, w: int) -> np.ndarray:
    """Canonical bands (local coordinates) of a reduced, non-constant node on an h x w grid."""
    index = _specs_of(node, {})
    if len(index) <= 16:
        operands = [_spec_band(s, h, w) for s in index]
        return nz.sweep(operands, _truth_table(node, index), h, w)
    if node[0] == "not":  # more than 16 atoms: evaluate children separately
        return nz.sweep([_node_bands(node[1], h, w)], [True, False], h, w)
    kids = [_node_bands(c, h, w) for c in node[1]]
    while len(kids) > 1:
        group = kids[:16]
        kids = [nz.sweep(group, _OP_TABLES[node[0]](len(group)), h, w)] + kids[16:]
    return kids[0]


# ---- assembly ------------------------------------------------------------------------------


def _partial_cells(front: _Front, root: tuple, grid: _Grid) -> dict:
    """{row band: [(column cell, local canonical bands or None for full)]} of the partial cells."""
    rows, cols = np.nonzero(grid.partial)
    if len(rows) > MAX_REGIONS:
        _fail(
            f"{len(rows)} cells of the floor / // / % grid have a boundary inside them "
            f"(MAX_REGIONS = {MAX_REGIONS}); use coarser divisors, or build the mask with "
            "builders and algebra"
        )
    Q, K, atoms = grid.Q.tolist(), grid.K.tolist(), front.atoms
    q_off: dict = {}
    k_off: dict = {}
    cache: dict = {}
    out: dict = {}
    for t, u in zip(rows.tolist(), cols.tolist()):
        tq = q_off.get(t) or q_off.setdefault(t, [int(x) for x in grid.q_off[t]])
        tk = k_off.get(u) or k_off.setdefault(u, [int(x) for x in grid.k_off[u]])
        r0, h, c0, w = Q[t], Q[t + 1] - Q[t], K[u], K[u + 1] - K[u]
        status = [_local(a, a.bound - tq[n] - tk[n], r0, c0, h, w) for n, a in enumerate(atoms)]
        red = _reduce(root, status)
        if red[0] == "const":  # the three-valued pass is never sharper than folding
            if red[1]:
                out.setdefault(t, []).append((u, None))
            continue
        key = (h, w, red)
        bands = cache.get(key)
        if bands is None:
            bands = cache[key] = _node_bands(red, h, w).tolist()
        if bands:
            out.setdefault(t, []).append((u, bands))
    return out


def _runs(full: np.ndarray, K: np.ndarray):
    """Maximal runs of full cells per row band: (row bands, first columns, end columns)."""
    n_rows, n_cols = full.shape
    pad = np.zeros((n_rows, n_cols + 2), dtype=np.int8)
    pad[:, 1:-1] = full
    step = np.diff(pad, axis=1)
    rows, first = np.nonzero(step == 1)
    _, end = np.nonzero(step == -1)
    return rows, K[first], K[end]


def _assemble(grid: _Grid, partial: dict, sq: int, sk: int) -> Mask:
    rows, lo, hi = _runs(grid.full, grid.K)
    Q = grid.Q
    if not partial:  # rectangles only
        arr = np.stack([Q[rows], Q[rows + 1], lo, hi, np.zeros_like(lo)], axis=1)
        return Mask._from_slice_array(arr, sq, sk)
    runs: dict = {}
    for t, a, b in zip(rows.tolist(), lo.tolist(), hi.tolist()):
        runs.setdefault(t, []).append((a, b, None))
    Ql, Kl = Q.tolist(), grid.K.tolist()
    canon = nz.Canon()
    for t in sorted(set(runs) | set(partial)):
        r0, r1 = Ql[t], Ql[t + 1]
        if t not in partial:
            canon.push(r0, r1, tuple(e for a, b, _ in runs[t] for e in ((a, 0), (b, 0))))
            continue
        items = sorted(runs.get(t, []) + _items(partial[t], Kl, r0), key=lambda it: it[0])
        _push_row_band(canon, items, r0, r1)
    return Mask._from_bands(canon.result(), sq, sk)


def _items(cells: list, K: list[int], r0: int) -> list:
    """Partial cells of a row band -> [(col_lo, col_hi, groups)], groups [(row0, row1, ends)]."""
    items = []
    for u, bands in cells:
        c0, c1 = K[u], K[u + 1]
        if bands is None:
            items.append((c0, c1, None))
            continue
        groups = []
        for b0, b1, ac, a_s, bc, b_s in bands:
            ends = ((ac + c0 - a_s * r0, a_s), (bc + c0 - b_s * r0, b_s))
            if groups and groups[-1][:2] == (b0 + r0, b1 + r0):
                groups[-1] = (b0 + r0, b1 + r0, groups[-1][2] + ends)
            else:
                groups.append((b0 + r0, b1 + r0, ends))
        items.append((c0, c1, groups))
    return items


def _push_row_band(canon: nz.Canon, items: list, r0: int, r1: int) -> None:
    """Push rows [r0, r1): items in column order, each None (full) or row groups of intervals."""
    items = [
        it if it[2] is not None else (it[0], it[1], [(r0, r1, ((it[0], 0), (it[1], 0)))])
        for it in items
    ]
    bounds = sorted({r0, r1, *(g[k] for it in items for g in it[2] for k in (0, 1))})
    ptr = [0] * len(items)
    for s, e in zip(bounds[:-1], bounds[1:]):
        pieces = []
        for x, (_, _, groups) in enumerate(items):
            p = ptr[x]
            while p < len(groups) and groups[p][1] <= s:
                p += 1
            ptr[x] = p
            if p < len(groups) and groups[p][0] <= s:
                pieces.append((x, groups[p][2]))
        _push_segment(canon, items, pieces, s, e)


def _push_segment(canon: nz.Canon, items: list, pieces: list, s: int, e: int) -> None:
    """Push rows [s, e): the pieces' intervals, merged where they touch across a cell border."""
    flat = []
    joins = []  # (index in flat of the right piece's first end, border column)
    for n, (x, ends) in enumerate(pieces):
        if n and pieces[n - 1][0] == x - 1 and items[x - 1][1] == items[x][0]:
            joins.append((len(flat), items[x][0]))
        flat.extend(ends)
    if not joins:
        canon.push(s, e, tuple(flat))
        return
    cuts = {s, e}
    for pos, col in joins:
        for c, slope in (flat[pos - 1], flat[pos]):
            if slope:  # a diagonal meets the border column on one row only: split it off
                cuts.update(r for r in (col - c, col - c + 1) if s < r < e)
    cuts = sorted(cuts)
    for u, v in zip(cuts[:-1], cuts[1:]):
        drop = set()
        for pos, col in joins:
            (lc, ls), (rc, rs) = flat[pos - 1], flat[pos]
            if all(lc + ls * i == col and rc + rs * i == col for i in (u, v - 1)):
                drop.update((pos - 1, pos))
        canon.push(u, v, tuple(end for n, end in enumerate(flat) if n not in drop))


# ---- entry point ---------------------------------------------------------------------------


def _size(value, what: str) -> int:
    n = as_int(value, f"from_predicate: {what}")
    if n < 0:
        _fail(f"{what} must be >= 0, got {n}")
    return n


def from_predicate(pred, sq: int, sk: int | None = None) -> Mask:
    """The exact mask ``{(i, j) in [0,sq) x [0,sk) : pred(i, j)}`` of a predicate over q and k.

    ``pred``: a sympy boolean expression in symbols named ``q`` and ``k`` (matched by name), or
    a string parsed with q and k as integers (``//`` floor division, ``%`` Mod, ``==``/``!=``,
    ``and``/``or``/``not``, chained comparisons). See the module docstring for what compiles; the
    rest raises `MaskError` naming the sub-expression, never an approximation.
    """
    sq = _size(sq, "sq")
    sk = sq if sk is None else _size(sk, "sk")
    import sympy as sp  # lazily: `import maskc` stays fast

    front = _Front(sp)
    expr = _parse_string(pred, sp) if isinstance(pred, str) else pred
    root = front.boolean(expr)
    if sq == 0 or sk == 0 or root == FALSE:
        return Mask._from_bands(np.zeros((0, 6), dtype=np.int64), sq, sk)
    grid = _grid(front, root, sq, sk)
    return _assemble(grid, _partial_cells(front, root, grid), sq, sk)


__all__ = ["ALLOWED", "MAX_CELLS", "MAX_REGIONS", "from_predicate"]
