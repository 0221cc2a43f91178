"""Model merging over stacks of flat task vectors, and the Sparse Backdoor Vector combination.

Every method maps a [K, D] stack of task vectors τ_1..τ_K (rows; any device) to ONE merged task
vector τ_merged of D values; the merged model is θ0 + τ_merged (the caller adds θ0).

    merge(vectors, "ties", k=0.2, lam=1.0)          # Weights in -> Weights out; tensor in -> tensor out

Coordinate-wise methods (average, task arithmetic, TIES, DARE, TALL, Consensus, SBV) are whole-tensor
ops on the stack. TSV-M and Iso-C are per-layer by nature: they run batched SVDs over all 2-D weight
matrices of the same shape at once (a loop over shape groups, not over coordinates). Which tensors
count as matrices differs from the official TSV-M / Iso-C code, plainly: that code decomposes every
2-D tensor except `text_projection` (so also the positional and token embeddings); here the embedding
tables (`NOT_MATRICES`) are not linear maps and join the biases, norms and conv stem in the fallback
lam · mean(τ). In an image encoder that changes only `positional_embedding` (and `proj`, which the
official code treats as a matrix and so do we).

Large temporaries are reused in place: on CPU a fresh [K, D] tensor costs more in page faults than
the arithmetic on it, and on GPU it is memory the caching allocator must hold. TIES (and its top-k
threshold), TALL, Consensus and SBV go further on CPU: they stream the stack through cache-sized
column slices (`column_slices`), so their several elementwise steps read main memory about once.
On CUDA the same steps are fused into a few GPU kernels by torch.compile (`fused`): the stack is read
once or twice instead of once per step.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bvlib.errors import BVLibError
from bvlib.weights import Layout, Weights, stack

# 2-D parameters that are embeddings, not linear maps: TSV-M / Iso-C leave them to the mean fallback.
NOT_MATRICES = ("positional_embedding", "class_embedding", "token_embedding", "text_projection")


# input handling -----------------------------------------------------------------------------
def _as_stack(
    vectors, layout: Layout | None, what: str = "vectors"
) -> tuple[torch.Tensor, Layout | None, bool]:
    """([K, D] stack, layout, whether to return Weights)."""
    if isinstance(vectors, torch.Tensor):
        s, as_weights = vectors, False
        if s.dim() != 2:
            raise BVLibError(f"expected a [K, D] stack of flat {what}, got a tensor of shape {list(s.shape)}")
        if layout is not None and layout.numel != s.shape[1]:
            raise BVLibError(
                f"the layout holds {layout.numel} values but the {what} have {s.shape[1]}; pass the matching "
                "layout"
            )
    elif isinstance(vectors, Weights) or not isinstance(vectors, Sequence):
        raise BVLibError(
            f"expected a list of Weights or a [K, D] tensor of {what}, got {type(vectors).__name__}"
        )
    else:
        if not all(isinstance(v, Weights) for v in vectors):
            raise BVLibError(f"expected a list of Weights or a [K, D] tensor of {what}")
        s, as_weights = stack(list(vectors)), True  # refuses mismatched layouts
        if layout is not None:
            layout.check_same(vectors[0].layout, what)
        layout = vectors[0].layout
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise BVLibError(f"need at least one non-empty vector to merge, got a stack of shape {list(s.shape)}")
    if not s.is_floating_point():
        raise BVLibError(f"{what} must be floating point, got {s.dtype}")
    return s, layout, as_weights


def _real(
    name: str, value, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False
) -> float:
    """Check a scalar parameter against an interval, with a one-line message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BVLibError(f"{name} must be a finite number, got {value!r}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        interval = (
            f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
            f"{'inf' if hi is None else hi}{')' if hi_open else ']'}"
        )
        raise BVLibError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def _int(name: str, value, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise BVLibError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


# fused GPU kernels -----------------------------------------------------------------------------
def fused(fn: Callable) -> Callable:
    """`fn` compiled by torch.compile when its first argument is on CUDA: its elementwise steps and
    reductions become a few fused kernels, each reading the [K, D] stack once (eager ops read it once
    per step: ~10 passes for TIES). Eager on CPU (the column-sliced code there is already cache-bound),
    with BVLIB_COMPILE=0, or if compiling fails (one warning, then eager for the process). The first
    call per dtype and number of tasks K compiles (seconds); later calls of any width D reuse it."""
    state: dict = {}

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args):
        if x.device.type != "cuda" or state.get("failed") or os.environ.get("BVLIB_COMPILE", "1") == "0":
            return fn(x, *args)
        if "compiled" not in state:
            state["compiled"] = torch.compile(fn)
        try:
            for a in (
                x,
                *args,
            ):  # any width D (in every argument that has it); K stays static (unrolled reductions)
                if isinstance(a, torch.Tensor) and a.dim() and a.shape[-1] == x.shape[-1] > 1:
                    torch._dynamo.mark_dynamic(a, a.dim() - 1)
            return state["compiled"](x, *args)
        except Exception as e:  # noqa: BLE001 -- no compiler, no Triton: the eager ops give the same result
            state["failed"] = True
            warnings.warn(
                f"torch.compile failed for {fn.__name__} ({type(e).__name__}: {str(e)[:120]}); "
                "merging with eager ops (set BVLIB_COMPILE=0 to skip the attempt)",
                stacklevel=2,
            )
            return fn(x, *args)

    return run


# exact per-row top-k threshold ----------------------------------------------------------------
CPU_CHUNK = 1 << 20  # values of a [K, columns] slice streamed at once on CPU (4 MB in fp32: cache-sized)


def column_slices(K: int, D: int, device: torch.device) -> list[slice]:
    """Column ranges to stream a [K, D] stack through: cache-sized slices on CPU, the whole stack on GPU.

    On CPU every full-size [K, D] temporary costs a trip to main memory (and page faults when fresh);
    a slice of ~CPU_CHUNK values stays in cache across the several ops done on it. On GPU each op is
    already bandwidth-bound and kernel launches are the cost, so the stack goes in one piece.
    """
    step = D if device.type != "cpu" else max(1, CPU_CHUNK // K)
    return [slice(i, min(i + step, D)) for i in range(0, D, step)]


def _streamed(stack: torch.Tensor, per_slice: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[D]: `per_slice` ([K, C] columns -> [C]) applied slice by slice over `column_slices`."""
    K, D = stack.shape
    slices = column_slices(K, D, stack.device)
    if len(slices) == 1:
        return per_slice(stack)
    out = torch.empty(D, dtype=stack.dtype, device=stack.device)
    for cols in slices:
        out[cols] = per_slice(stack[:, cols])
    return out


def kth_largest(
    a: torch.Tensor, n: int, *, magnitude: bool = False, sample: int | None = None, z: float = 6.0
) -> torch.Tensor:
    """Exact n-th largest value of each row of a finite [K, D] tensor (of |a| with magnitude=True), without
    sorting.

    Sample-select (Floyd & Rivest 1975): `sample` random columns (default 2^16 on CPU, 2^20 on GPU)
    bracket the answer in [lo, hi] (± z standard deviations of its rank in the sample); one streamed
    pass over the rows (`column_slices`) counts the values above hi and gathers those inside [lo, hi]
    (~12·sqrt(q(1−q)/sample) of a row: ~2% on CPU, ~0.5% on GPU) for an exact selection per row. A missed
    bracket (probability ~1e-9 per row at z=6) or a tie-heavy row (e.g. mostly exact zeros) falls back
    to `torch.kthvalue` on the whole rows. The sample changes only the speed: the result always equals
    `a.kthvalue(D − n + 1, dim=1).values` (of `a.abs()` with magnitude=True). |a| is never stored whole.
    """
    K, D = a.shape
    if not 1 <= n <= D:
        raise BVLibError(f"n must be in [1, {D}], got {n}")
    dev = a.device

    def exact():
        return (a.abs() if magnitude else a).kthvalue(D - n + 1, dim=1).values

    sample = sample or (1 << 16 if dev.type == "cpu" else 1 << 20)
    if D <= 4 * sample:
        return exact()
    gen = torch.Generator(device=dev).manual_seed(0)
    picked = a[:, torch.randint(D, (sample,), generator=gen, device=dev)]  # [K, sample]
    if magnitude:
        picked = picked.abs_()
    f = n / D
    j, delta = sample * (1.0 - f), z * math.sqrt(sample * f * (1.0 - f)) + 8
    lo_i, hi_i = math.floor(j - delta), math.ceil(j + delta)
    if lo_i < 0 or hi_i >= sample:  # the answer is near an end of the row: nothing to gain
        return exact()
    if dev.type == "cuda":  # CUDA's kthvalue is one thread block per row (~7 ms for 2^20 values): sort
        ordered = picked.sort(dim=1).values
        lo, hi = ordered[:, lo_i : lo_i + 1], ordered[:, hi_i : hi_i + 1]
    else:
        lo = picked.kthvalue(lo_i + 1, dim=1, keepdim=True).values
        hi = picked.kthvalue(hi_i + 1, dim=1, keepdim=True).values
    budget = 16 * (hi_i - lo_i + 1) * D // sample + 1  # 16 × the expected count per row: more means ties
    slices = column_slices(K, D, dev)
    if len(slices) == 1:  # the whole stack at once (GPU): one fused pass counts and marks, one gather
        above, inside, n_in = _bracket(a, lo, hi, magnitude)
        if int(n_in.max()) > budget:
            return exact()
        values = a[inside].abs_() if magnitude else a[inside]
        inside_values = [[v] for v in torch.split(values, n_in.tolist())]
        return _select_inside(inside_values, n - above, n_in, budget, dev, exact)
    above = torch.zeros(K, dtype=torch.long, device=dev)
    n_in = torch.zeros(K, dtype=torch.long, device=dev)
    inside_values: list[list[torch.Tensor]] = [
        [] for _ in range(K)
    ]  # per row, its values in [lo, hi], slice by slice
    width = slices[0].stop - slices[0].start
    bufs = torch.empty(
        3, K * width, dtype=a.dtype, device=dev
    )  # |x|, x > hi, x >= lo: reused for every slice
    for cols in slices:
        size = K * (cols.stop - cols.start)
        x, gt_hi, ge_lo = (buf[:size].view(K, -1) for buf in bufs)
        x = torch.abs(a[:, cols], out=x) if magnitude else a[:, cols]
        above += _row_counts(torch.gt(x, hi, out=gt_hi))
        inside = torch.ge(x, lo, out=ge_lo).sub_(gt_hi)  # 1.0 where lo <= x <= hi (lo <= hi)
        counts = _row_counts(inside)
        n_in += counts
        for row, values in zip(inside_values, torch.split(x[inside.bool()], counts.tolist())):
            row.append(values)
        if len(slices) > 1 and int(n_in.max()) > budget:
            return exact()
    return _select_inside(inside_values, n - above, n_in, budget, dev, exact)


@fused
def _bracket(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, magnitude: bool):
    """Per row: the count above hi, the mask of values in [lo, hi], and its count."""
    x = a.abs() if magnitude else a
    inside = (x >= lo) & (x <= hi)
    return (x > hi).sum(1), inside, inside.sum(1)


def _select_inside(inside_values, r, n_in, budget, dev, exact) -> torch.Tensor:
    """Each row's r-th largest value among those inside its bracket (`exact()` when it is not there)."""
    if not bool(((r >= 1) & (r <= n_in)).all()) or int(n_in.max()) > budget:
        return exact()
    out = []
    for row, rank in zip(inside_values, r.tolist()):
        values = torch.cat(row) if len(row) > 1 else row[0]
        if dev.type == "cpu":  # quickselect; CUDA's kthvalue is one block per row, its sort is fast
            out.append(values.kthvalue(len(values) - rank + 1).values)
        else:
            out.append(values.sort(descending=True).values[rank - 1])
    return torch.stack(out)


def _row_counts(ones: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Exact int64 row sums of a [K, D] float 0/1 tensor.

    Float sums are the fast reductions on CPU (bool/int reductions are ~10x slower there) but a
    float32 sum is exact only below 2^24: sum chunks of 2^22 columns, then add the chunk counts.
    """
    K, D = ones.shape
    acc = torch.float64 if ones.dtype == torch.float64 else torch.float32  # half types: sum in float32
    full = D // chunk * chunk
    counts = ones[:, full:].sum(1, dtype=acc).round().long()
    if full:
        counts += ones[:, :full].reshape(K, -1, chunk).sum(2, dtype=acc).round().long().sum(1)
    return counts


# the methods: each maps a [K, D] stack (+ layout) to a [D] merged task vector -------------------
def average(stack: torch.Tensor, *, layout: Layout | None = None) -> torch.Tensor:
    """Weight averaging (model soup; Wortsman et al. 2022): mean of the τ's."""
    return stack.mean(0)


def task_arithmetic(stack: torch.Tensor, *, layout: Layout | None = None, lam: float = 0.3) -> torch.Tensor:
    """Task Arithmetic (Ilharco et al., ICLR 2023): lam · Σ τ."""
    lam = _real("lam", lam)
    return stack.sum(0).mul_(lam)


TIES_DISJOINT = ("mean", "sum")


def ties(
    stack: torch.Tensor,
    *,
    layout: Layout | None = None,
    k: float = 0.2,
    lam: float = 1.0,
    disjoint: str = "mean",
) -> torch.Tensor:
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean (or sum), × lam.

    Trim: each τ keeps the coordinates with |τ| >= its n-th largest magnitude, n = max(1, ⌊k·D⌋)
    (exact threshold from `kth_largest`; ties at the threshold are all kept. The official code keeps
    n + 1 through kthvalue(D − n)). Elect: sign of the summed trimmed values (mass); a coordinate
    whose mass is exactly 0 takes the majority of the elected signs, as in the official code.
    Disjoint mean: mean over the tasks whose trimmed value has the elected sign (0 where none).
    disjoint="sum" keeps their sum instead: BadMerging's evaluation convention (TIES k 20%, disjoint
    sum × 0.3), under which a merge is on task arithmetic's scale rather than one task vector's.
    """
    lam = _real("lam", lam)
    if disjoint not in TIES_DISJOINT:
        raise BVLibError(f"disjoint must be one of: {', '.join(TIES_DISJOINT)}; got {disjoint!r}")
    part = ties_part(stack, ties_thresholds(stack, k), disjoint=disjoint)
    return ties_finish([part], disjoint=disjoint)[0].mul_(lam)


def ties_thresholds(stack: torch.Tensor, k: float = 0.2) -> torch.Tensor | None:
    """TIES's trim: the [K, 1] magnitude each τ must reach to be kept (None: keep all)."""
    k = _real("k", k, 0, 1, lo_open=True)
    K, D = stack.shape
    n = max(1, int(k * D))
    return kth_largest(stack, n, magnitude=True).unsqueeze(1) if n < D else None


@dataclass
class TiesPart:
    """TIES on some columns: merged values, the count of positive minus negative elected signs, and
    the coordinates whose mass cancelled exactly (resolved once every column is seen)."""

    out: torch.Tensor
    sign_balance: int
    undecided: torch.Tensor  # indices into `out`
    undecided_trimmed: torch.Tensor  # [K, len(undecided)]


def ties_part(stack: torch.Tensor, thresholds: torch.Tensor | None, *, disjoint: str = "mean") -> TiesPart:
    """TIES on the columns of `stack` with given (whole-vector) trim thresholds, before λ: what a
    streamed merge runs per group of tensors. `ties_finish` resolves the cancelled coordinates."""
    if disjoint not in TIES_DISJOINT:
        raise BVLibError(f"disjoint must be one of: {', '.join(TIES_DISJOINT)}; got {disjoint!r}")
    by_count = disjoint == "mean"
    K, D = stack.shape
    dev, dtype = stack.device, stack.dtype
    slices = column_slices(K, D, dev)
    if len(slices) == 1:  # the whole stack at once (GPU): fused kernels
        keep_all = torch.zeros(K, 1, dtype=dtype, device=dev)  # |x| >= 0 keeps every finite value
        out, mass, cancelled = _ties_columns(stack, keep_all if thresholds is None else thresholds, by_count)
        return _ties_tail(stack, thresholds, out, mass, [cancelled.nonzero().squeeze(1)])
    out, mass = torch.empty(D, dtype=dtype, device=dev), torch.empty(D, dtype=dtype, device=dev)
    undecided = []  # coordinates whose trimmed values cancel exactly: mass 0, yet something was kept
    bufs = torch.empty(
        2, K * (slices[0].stop - slices[0].start), dtype=dtype, device=dev
    )  # reused by every slice
    for cols in slices:  # streamed (CPU): every temporary is one cache-sized slice
        x = stack[:, cols]
        keep, trimmed = (buf[: x.numel()].view_as(x) for buf in bufs)
        if thresholds is None:
            keep.fill_(1.0)
        else:
            torch.ge(torch.abs(x, out=keep), thresholds, out=keep)  # 1.0 / 0.0
        kept = keep.sum(0)
        torch.mul(keep, x, out=trimmed)
        m = torch.sum(trimmed, 0, out=mass[cols])
        elected = torch.sign(m)
        agreeing = trimmed.mul_(elected).clamp_min_(0)  # |value| where the sign agrees, else 0
        total = agreeing.sum(0)
        count = agreeing.sign_().sum(0)
        out[cols] = total.mul_(elected).div_(count.clamp_min_(1)) if by_count else total.mul_(elected)
        cancelled = (m == 0) & (kept > 0)
        if bool(cancelled.any()):
            undecided.append(cancelled.nonzero().squeeze(1) + cols.start)
    return _ties_tail(stack, thresholds, out, mass, undecided)


@fused
def _ties_columns(x: torch.Tensor, thresholds: torch.Tensor, by_count: bool):
    """TIES on the whole [K, D] stack in plain ops (fused on GPU): merged values before λ, the mass
    (sum of the trimmed values) and the coordinates whose mass cancelled although something was kept."""
    keep = x.abs() >= thresholds
    trimmed = x * keep
    mass = trimmed.sum(0)
    elected = torch.sign(mass)
    agreeing = (trimmed * elected).clamp_min(0)  # |value| where the sign agrees, else 0
    total = agreeing.sum(0) * elected
    out = total / (agreeing > 0).sum(0).clamp_min(1) if by_count else total
    return out.to(x.dtype), mass, (mass == 0) & keep.any(0)


def _ties_tail(stack, thresholds, out, mass, undecided: list[torch.Tensor]) -> TiesPart:
    idx = torch.cat(undecided) if undecided else torch.empty(0, dtype=torch.long, device=stack.device)
    x = stack[:, idx]
    trimmed = torch.where(x.abs() >= thresholds, x, 0.0) if thresholds is not None else x
    return TiesPart(out, int(torch.sign(mass).sum(dtype=torch.int64)), idx, trimmed)


def ties_finish(parts: Sequence[TiesPart], *, disjoint: str = "mean") -> list[torch.Tensor]:
    """The cancelled coordinates of every part take the majority of all elected signs, as in the
    official code; returns each part's merged values (before λ)."""
    balance = sum(p.sign_balance for p in parts)
    majority = float((balance > 0) - (balance < 0))
    for p in parts:
        if len(p.undecided):
            agree = (p.undecided_trimmed * majority > 0).to(p.out.dtype)
            p.out[p.undecided] = (p.undecided_trimmed * agree).sum(0) / (
                agree.sum(0).clamp_min(1) if disjoint == "mean" else 1
            )
    return [p.out for p in parts]


_DARE_BASES = ("task_arithmetic", "ties")


def dare(
    stack: torch.Tensor,
    *,
    layout: Layout | None = None,
    p: float = 0.9,
    lam: float = 0.3,
    seed: int = 0,
    base: str = "task_arithmetic",
    **base_params,
) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): drop and rescale, then merge.

    Each coordinate of each τ is dropped with probability p and the kept ones are rescaled by
    1/(1 − p); the result is merged with `base` (task arithmetic, or TIES with its `k`) and lam.
    The mask comes from a counter-based generator (`dare_uniform`): a pure function of the seed, the
    tensor's name, the row and the coordinate, so the same seed gives the same mask on every device
    and in every dtype, and on CUDA the draw, the drop and the sum are one fused kernel that never
    writes the [K, D] mask. The uniform numbers are float32 whatever the stack's dtype: bfloat16 has
    8 bits of mantissa, so `rand >= 0.99` in bfloat16 would keep about 3/256 of the coordinates.
    """
    p, lam, seed = _real("p", p, 0, 1, hi_open=True), _real("lam", lam), _int("seed", seed)
    if base not in _DARE_BASES:
        raise BVLibError(f"DARE base must be one of {', '.join(_DARE_BASES)}, got {base!r}")
    if base == "task_arithmetic" and base_params:
        raise BVLibError(f"DARE with task_arithmetic takes no {', '.join(base_params)}")
    keys, rows = dare_keys(stack, seed, layout), dare_row_offsets(stack.shape[0], stack.device)
    K, D = stack.shape
    summed = base == "task_arithmetic"
    slices = column_slices(K, D, stack.device)
    if len(slices) == 1:
        out = _dare_columns(stack, keys, rows, p, summed)
    else:  # CPU: stream cache-sized column slices (the int64 temporaries are twice the stack's size)
        out = torch.empty(D if summed else (K, D), dtype=stack.dtype, device=stack.device)
        for cols in slices:
            out[..., cols] = _dare_columns(stack[:, cols], keys[cols], rows, p, summed)
    if summed:
        return out.mul_(lam / (1.0 - p))
    return _call(base, out.div_(1.0 - p), layout, {"lam": lam, **base_params})


@fused
def _dare_columns(
    x: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, p: float, summed: bool
) -> torch.Tensor:
    """The kept values of `x` (0 where dropped), or their sum over the tasks with summed=True."""
    kept = torch.where(dare_uniform(keys, rows) >= p, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum(0) if summed else kept


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's increment, as a signed int64
_ROW_STEP = 0xD1B54A32D192ED03 - (1 << 64)  # an odd constant: row k's stream starts k·_ROW_STEP further


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on a fresh int64 tensor, in place: wrapping products, and logical
    right shifts as arithmetic ones masked (in-place ops: on CPU the temporaries are the cost)."""
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
        x.bitwise_xor_(x.bitwise_right_shift(shift).bitwise_and_((1 << (64 - shift)) - 1))
        if factor is not None:
            x.mul_(factor - (1 << 64))
    return x


def dare_uniform(keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[K, C] float32 uniforms in [0, 1) with 24 random bits: splitmix64 outputs at the counters
    `keys` [C] (`dare_keys`) plus each row's offset `rows` [K, 1] (`dare_row_offsets`). Plain integer
    ops, so bit-identical on any device."""
    bits = _mix64(keys + rows).bitwise_right_shift_(40).bitwise_and_(0xFFFFFF)
    return bits.to(torch.float32).mul_(2.0**-24)


def dare_row_offsets(rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows, 1] int64: row k's stream starts k·_ROW_STEP further along (a tensor, not an index
    computed inside a compiled kernel, where Triton would multiply it in int32)."""
    return torch.arange(rows, device=device, dtype=torch.int64).mul_(_ROW_STEP).unsqueeze(1)


def dare_keys(stack: torch.Tensor, seed: int, layout: Layout | None = None) -> torch.Tensor:
    """[D] int64 counters of DARE's generator: coordinate i of tensor `name` gets s + (i + 1)·golden,
    s hashed from the seed and the name (the whole stack is one tensor without a layout), so that a
    merge streamed tensor by tensor (`bvlib.checkpoints`) draws the same mask as one over the stack.
    Built as one cumulative sum of golden steps with a jump at each tensor's first coordinate (one
    pass; `repeat_interleave` over few long tensors is one CUDA thread per tensor)."""
    if layout is None:
        names, offsets, numels = ("",), (0,), (stack.shape[1],)
    else:
        names, offsets, numels = layout.names, layout.offsets, layout.numels
    wrap = 1 << 64
    steps = torch.full((stack.shape[1],), _GOLDEN, dtype=torch.int64, device=stack.device)
    jumps, previous = [], 0  # the counter before each tensor's first coordinate
    for name, numel in zip(names, numels):
        s = int.from_bytes(hashlib.sha256(f"dare:{seed}:{name}".encode()).digest()[:8], "little")
        jump = (s + _GOLDEN - previous) % wrap
        jumps.append(jump - wrap if jump >= 1 << 63 else jump)
        previous = (s + numel * _GOLDEN) % wrap
    at = torch.tensor(offsets, dtype=torch.int64, device=stack.device)
    steps[at] = torch.tensor(jumps, dtype=torch.int64, device=stack.device)
    return steps.cumsum_(0)


def _tall_lambdas(stack: torch.Tensor, tall_lambda) -> float | torch.Tensor:
    """TALL's λ_t checked: a number, or a [K, 1] tensor of one number per task."""
    K = stack.shape[0]
    if isinstance(tall_lambda, (int, float)) and not isinstance(tall_lambda, bool):
        return _real("tall_lambda", tall_lambda, 0)
    vals = list(tall_lambda) if isinstance(tall_lambda, Sequence) else None
    if vals is None or len(vals) != K:
        raise BVLibError(f"tall_lambda must be a number or one number per task ({K}), got {tall_lambda!r}")
    return torch.tensor(
        [_real("tall_lambda", v, 0) for v in vals], dtype=stack.dtype, device=stack.device
    ).unsqueeze(1)


def _tall_mask_values(stack: torch.Tensor, total: torch.Tensor, lam_t: float | torch.Tensor) -> torch.Tensor:
    """TALL masks as a 0/1 [K, D] tensor of the stack's dtype: |τ_t| > |τ_MTL − τ_t| · λ_t."""
    rhs = torch.sub(total, stack).abs_().mul_(lam_t)
    return (stack.abs() > rhs).to(stack.dtype)


@fused
def _tall_columns(x: torch.Tensor, lam_t: float | torch.Tensor) -> torch.Tensor:
    return (_tall_mask_values(x, x.sum(0), lam_t) * x).sum(0)


@fused
def _consensus_columns(x: torch.Tensor, lam_t: float | torch.Tensor, k: int) -> torch.Tensor:
    total = x.sum(0)
    return total * (_tall_mask_values(x, total, lam_t).sum(0) >= k)


def tall_masks(stack: torch.Tensor, tall_lambda: float | Sequence[float] = 0.4) -> torch.Tensor:
    """[K, D] bool TALL masks (Wang et al., ICML 2024): m_t = |τ_t| > |τ_MTL − τ_t| · λ_t, τ_MTL = Σ τ.

    A coordinate is on for task t where τ_t carries more of it than all the other tasks together
    (scaled by λ_t; a number, or one per task). The paper writes >=, its official code >; we use >
    so that a task never claims a coordinate where its τ is exactly 0 (with >=, every task would
    claim the coordinates that are 0 in all τ's, and any coordinate at λ_t = 0).
    """
    s, _, _ = _as_stack(stack, None)
    return _tall_mask_values(s, s.sum(0), _tall_lambdas(s, tall_lambda)).bool()


def tall(
    stack: torch.Tensor,
    *,
    layout: Layout | None = None,
    lam: float = 0.3,
    tall_lambda: float | Sequence[float] = 0.4,
) -> torch.Tensor:
    """TALL-masked task arithmetic: lam · Σ_t m_t ⊙ τ_t (masks from `tall_masks`).

    Wang et al. use the masks to compress: task t's model is θ0 + m_t ⊙ τ_MTL. A single merged
    model needs one vector, so here each task contributes only the coordinates its mask claims.
    """
    lam, lam_t = _real("lam", lam), _tall_lambdas(stack, tall_lambda)
    return _streamed(stack, lambda x: _tall_columns(x, lam_t)).mul_(lam)


def consensus_mask(
    stack: torch.Tensor, k: int = 2, tall_lambda: float | Sequence[float] = 0.4
) -> torch.Tensor:
    """[D] bool: coordinates on in at least k of the TALL masks (Wang et al., ICML 2024).

    k=2 removes both "catastrophic" weights (no task claims them) and "selfish" ones (one task).
    """
    s, _, _ = _as_stack(stack, None)
    k = _int("k", k)
    return _tall_mask_values(s, s.sum(0), _tall_lambdas(s, tall_lambda)).sum(0) >= k


def consensus(
    stack: torch.Tensor,
    *,
    layout: Layout | None = None,
    lam: float = 0.3,
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.4,
) -> torch.Tensor:
    """Consensus Task Arithmetic (Wang et al., ICML 2024): lam · (consensus mask ⊙ Σ τ)."""
    lam, k, lam_t = _real("lam", lam), _int("k", k), _tall_lambdas(stack, tall_lambda)
    return _streamed(stack, lambda x: _consensus_columns(x, lam_t, k)).mul_(lam)


def _matrix_groups(layout: Layout) -> dict[tuple[int, int], list[int]]:
    """Offsets of the 2-D weight matrices, grouped by shape (one batched SVD per group)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for name, shape, off in zip(layout.names, layout.shapes, layout.offsets):
        if len(shape) == 2 and min(shape) > 0 and not any(tag in name for tag in NOT_MATRICES):
            groups.setdefault((shape[0], shape[1]), []).append(off)
    return groups


def _need_layout(layout: Layout | None, method: str) -> Layout:
    if layout is None:
        raise BVLibError(
            f"'{method}' works per layer: pass layout= (or Weights) so the 2-D weight matrices can be found"
        )
    return layout


def _svd_dtype(t: torch.Tensor) -> torch.Tensor:
    """SVD needs float32/float64; half-precision inputs are decomposed in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch of matrices. On CUDA, cuSOLVER's approximate driver gesvda first (at
    ViT-B-32's shapes ~30× faster per matrix than the default, measured on an H100), each result
    checked (reconstruction ‖U S Vᵀ − X‖ / ‖X‖ and orthonormal U, V to a backward-stable SVD's error);
    the matrices that fail (gesvda goes through the Gram matrix, so ill-conditioned or rank-deficient
    ones can) are redone with the QR-based gesvd (not torch's batched default, gesvdj, which misses
    the check even on random matrices: measured on an H200), and those that still fail on the CPU."""
    if x.device.type != "cuda" or os.environ.get("BVLIB_SVD_DRIVER") == "default":
        return torch.linalg.svd(x, full_matrices=False)
    if x.shape[-2] < x.shape[-1]:  # gesvda wants tall matrices: X = U S Vᵀ  <=>  Xᵀ = V S Uᵀ
        v, s, uh = _svd(x.mT)
        return uh.mT, s, v.mT
    batch, (m, n) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, m, n)
    u, s, vh = _cusolver_svd(flat, "gesvda")
    bad = svd_failures(flat, u, s, vh)
    if bool(bad.any()):
        hard = flat[bad]
        redo = list(_cusolver_svd(hard, "gesvd"))
        still = svd_failures(hard, *redo)
        if bool(still.any()):
            for t, exact in zip(redo, torch.linalg.svd(hard[still].cpu(), full_matrices=False)):
                t[still] = exact.to(t.device)
        u[bad], s[bad], vh[bad] = redo
    return u.view(*batch, m, n), s.view(*batch, n), vh.view(*batch, n, n)


def _cusolver_svd(x: torch.Tensor, driver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd of [B, m, n] with a cuSOLVER driver, where a matrix the driver fails on
    comes back as NaN factors (a failure for svd_failures). cuSOLVER refuses a whole batch when one
    matrix does not converge (gesvda on a rank-deficient one), so a refused batch is halved."""
    try:
        return torch.linalg.svd(x, full_matrices=False, driver=driver)
    except RuntimeError:
        if len(x) == 1:
            m, n = x.shape[-2:]
            k = min(m, n)
            return (
                x.new_full((1, m, k), float("nan")),
                x.new_full((1, k), float("nan")),
                x.new_full((1, k, n), float("nan")),
            )
        half = len(x) // 2
        return tuple(
            torch.cat(p) for p in zip(_cusolver_svd(x[:half], driver), _cusolver_svd(x[half:], driver))
        )


def svd_errors(
    x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch] relative reconstruction errors ‖U S Vᵀ − X‖ / ‖X‖ and [batch] orthonormality errors
    (largest |entry| of UᵀU − I and V Vᵀ − I) of the thin SVDs (u, s, vh) of `x`."""
    eye = torch.eye(s.shape[-1], dtype=x.dtype, device=x.device)
    scale = torch.linalg.matrix_norm(x).clamp_min(torch.finfo(x.dtype).tiny)
    recon = torch.linalg.matrix_norm((u * s.unsqueeze(-2)) @ vh - x) / scale
    orth = torch.maximum((u.mT @ u - eye).abs().amax((-2, -1)), (vh @ vh.mT - eye).abs().amax((-2, -1)))
    return recon, orth


def svd_failures(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """[batch] bool: the thin SVDs (u, s, vh) of `x` whose `svd_errors` exceed a backward-stable
    SVD's error (8·sqrt(max(m, n))·eps: ~3e-5 in float32 at 768). NaN or inf anywhere is a failure
    (a rank-deficient matrix can give 0/0 through the Gram matrix)."""
    tol = 8 * max(x.shape[-2:]) ** 0.5 * torch.finfo(x.dtype).eps
    recon, orth = svd_errors(x, u, s, vh)
    return ~((recon <= tol) & (orth <= tol))  # comparisons with NaN are False: a failure


def _polar(x: torch.Tensor) -> torch.Tensor:
    """Closest matrix with orthonormal columns (or rows): P Qᵀ from x = P S Qᵀ."""
    p, _, qh = _svd(x)
    return p @ qh


def tsv(
    stack: torch.Tensor, *, layout: Layout | None = None, lam: float = 1.0, rank_share: float | None = None
) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors"): per layer, orthogonalised low-rank sum.

    For each 2-D weight matrix (m × n, r = min(m, n)): SVD of every task's matrix (one batched SVD
    per shape group); each task keeps its top max(1, ⌊rank_share · r⌋) singular triplets
    (rank_share=None: 1/K), dropping numerically zero ones (σ <= σ_max · max(m, n) · eps), which only
    matter when rank_share > 1/K; the kept U's and V's are concatenated across tasks and replaced by
    their polar factors (U⊥ = P Qᵀ from svd(U_cat) = P S Qᵀ, same for V), and the layer becomes
    lam · U⊥ diag(σ_cat) V⊥ᵀ. Other parameters: lam · mean(τ), as the official code.
    """
    layout = _need_layout(layout, "tsv")
    lam = _real("lam", lam)
    K = stack.shape[0]
    share = 1.0 / K if rank_share is None else _real("rank_share", rank_share, 0, 1, lo_open=True)
    out = stack.mean(0).mul_(lam)
    for (m, n), offs in _matrix_groups(layout).items():
        L, r = len(offs), min(m, n)
        keep = min(r, max(1, int(share * r)))
        x = _svd_dtype(
            torch.stack([stack[:, o : o + m * n].view(K, m, n) for o in offs], dim=1)
        )  # [K, L, m, n]
        u, s, vh = _svd(x)
        u, s, vh = u[..., :keep], s[..., :keep], vh[..., :keep, :]
        nonzero = s > s[..., :1] * (max(m, n) * torch.finfo(s.dtype).eps)
        s = s * nonzero
        u, vh = u * nonzero.unsqueeze(-2), vh * nonzero.unsqueeze(-1)
        u_cat = u.permute(1, 2, 0, 3).reshape(L, m, K * keep)  # task-major column blocks
        vh_cat = vh.permute(1, 0, 2, 3).reshape(L, K * keep, n)
        s_cat = s.permute(1, 0, 2).reshape(L, 1, K * keep)
        merged = (_polar(u_cat) * s_cat) @ _polar(vh_cat)  # [L, m, n]
        merged = merged.to(stack.dtype).mul_(lam)
        for i, o in enumerate(offs):
            out[o : o + m * n] = merged[i].reshape(-1)
    return out


def iso_c(stack: torch.Tensor, *, layout: Layout | None = None, lam: float = 1.0) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging").

    Per 2-D weight matrix: M = Σ_t τ_t = U S Vᵀ; the spectrum is flattened to its mean σ̄, giving
    lam · σ̄ · U Vᵀ, so no task's directions dominate. Other parameters: lam · mean(τ), as the
    official code. The paper tunes lam (α) around 1.0–1.5.
    """
    layout = _need_layout(layout, "iso_c")
    lam = _real("lam", lam)
    total = stack.sum(0)
    out = stack.mean(0).mul_(lam)
    for (m, n), offs in _matrix_groups(layout).items():
        mats = _svd_dtype(torch.stack([total[o : o + m * n].view(m, n) for o in offs]))  # [L, m, n]
        u, s, vh = _svd(mats)
        merged = (u @ vh).mul_(s.mean(-1, keepdim=True).unsqueeze(-1))
        merged = merged.to(stack.dtype).mul_(lam)
        for i, o in enumerate(offs):
            out[o : o + m * n] = merged[i].reshape(-1)
    return out


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "tall": tall,
    "consensus": consensus,
    "tsv": tsv,
    "iso_c": iso_c,
}


def _call(method: str, s: torch.Tensor, layout: Layout | None, params: dict) -> torch.Tensor:
    fn = METHODS.get(method)
    if fn is None:
        raise BVLibError(f"unknown merging method {method!r}; choose one of: {', '.join(METHODS)}")
    sig = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    accepted = [
        name
        for name, p in sig.items()
        if name not in ("stack", "layout") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    unknown = [name for name in params if name not in accepted]
    if unknown and not takes_any:
        raise BVLibError(
            f"merging method {method!r} has no parameter {unknown[0]!r}; its parameters: "
            f"{', '.join(accepted) or 'none'}"
        )
    return fn(s, layout=layout, **params)


def merge(
    vectors: Sequence[Weights] | torch.Tensor,
    method: str = "task_arithmetic",
    *,
    layout: Layout | None = None,
    **params,
) -> Weights | torch.Tensor:
    """Merged task vector τ_merged of K task vectors (NOT θ0 + τ: the caller adds θ0).

    `vectors`: a list of Weights sharing one layout, or a [K, D] tensor (then `layout` is needed only
    by the per-layer methods tsv and iso_c). Returns Weights for Weights, a [D] tensor for a tensor,
    on the input's device and dtype; the input is never modified.
    """
    s, layout, as_weights = _as_stack(vectors, layout)
    out = _call(method, s, layout, params)
    return Weights(out, layout) if as_weights else out


def _sign_counts(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate: how many rows are > 0 and how many are < 0 (float counts, exact for K < 2^24)."""
    buf = torch.gt(s, 0, out=torch.empty_like(s))
    pos = buf.sum(0)
    neg = torch.lt(s, 0, out=buf).sum(0)
    return pos, neg


def sign_agreement(vectors: Sequence[Weights] | torch.Tensor) -> torch.Tensor:
    """[D]: share of the K vectors whose (non-zero) sign is the majority sign (0 where all are 0)."""
    s, _, _ = _as_stack(vectors, None)
    pos, neg = _sign_counts(s)
    return torch.maximum(pos, neg).div_(s.shape[0])
