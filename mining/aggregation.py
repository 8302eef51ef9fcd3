"""Robust aggregation of DoRA adapter submissions (pure PyTorch, no Django).

Each submission is a PEFT-format DoRA state dict (`<module>.lora_A.weight` [r, in],
`<module>.lora_B.weight` [out, r], `<module>.lora_magnitude_vector` [out]) plus its scaling
`s = alpha / r`. Averaging A and B separately is not the average of the adapters
(mean(B) @ mean(A) != mean(B @ A)), so every method works where coordinates are comparable:
per module, the weight delta `s * B @ A` [out, in] and the magnitude vector m [out].

What is exact (up to float32 rounding), and what is not:
- `mean`, `krum`, `multi_krum` produce a (weighted) average of whole submissions. That average is
  returned *stacked* (FLoRA): A_out = [A_1; ...; A_k], B_out = [w_1 s_1/s B_1, ..., w_k s_k/s B_k],
  so s * B_out @ A_out = sum_i w_i s_i B_i A_i exactly, at rank sum(r_i). Magnitudes are the
  same weighted mean. With only honest submissions, `mean` therefore equals the true weighted
  average of the weight deltas. When sum(r_i) exceeds min(out, in) of the widest module the stack
  is re-factored by an SVD to that width, which is still exact (no delta has a higher rank).
- `trimmed_mean` and `median` are coordinate-wise, so their result is a dense delta of unknown
  rank; it is factored back by truncated SVD to `rank` (default sum(r_i), capped at
  min(out, in)). That is exact only when the dense result has rank <= the output rank; the
  relative Frobenius error of the truncation is always reported (`svd_error`).
- Passing `rank=k` to any method compresses the result to rank k by truncated SVD (keeps the
  adapter's size stable from round to round) and reports the error the same way.

Before any method runs, a submission is rejected (with a reason) for: keys that are not PEFT
LoRA/DoRA keys, non-floating dtypes, tensors that do not chain or whose shapes differ from the
majority's, NaN/Inf, a bad scaling, or an update norm far outside the others (modified z-score
of Iglewicz and Hoaglin, |z| > `z_threshold`, computed when at least 3 submissions remain, and
the norm more than `min_ratio` times above, or below, the median norm).
Update norms are measured from `base` (the round's starting adapter) when given, else from the
coordinate-wise median of the submissions.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

PEFT_PREFIX = "base_model.model."
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Rejected(Exception):
    """A submission that cannot take part; the message is the reason shown to the miner."""


@dataclass
class Module:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    m: torch.Tensor | None  # [out]


@dataclass
class Report:
    method: str
    included: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    rank: int = 0
    alpha: float = 0.0
    scaling: float = 0.0
    exact: bool = True
    svd_error: float = 0.0  # relative Frobenius error of the SVD truncation, worst module
    norms: dict[int, float] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)  # Krum scores

    def as_dict(self):
        return {
            "method": self.method,
            "included": self.included,
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "weights": {str(k): v for k, v in self.weights.items()},
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "exact": self.exact,
            "svd_error": self.svd_error,
            "norms": {str(k): v for k, v in self.norms.items()},
            "scores": {str(k): v for k, v in self.scores.items()},
        }


# -- parsing and checks --------------------------------------------------------------------------
def parse_adapter(state, scaling) -> dict[str, Module]:
    """Module path -> Module, or Rejected saying what is wrong with the submission."""
    if not isinstance(state, dict) or not state:
        raise Rejected("the adapter contains no tensors")
    try:
        scaling = float(scaling)
    except (TypeError, ValueError):
        raise Rejected(f"scaling {scaling!r} is not a number") from None
    if not math.isfinite(scaling) or scaling <= 0:
        raise Rejected(f"scaling {scaling} must be a finite positive number")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = KEY_RE.match(key)
        if not match:
            raise Rejected(f"unexpected tensor {key!r} (not a PEFT LoRA/DoRA key)")
        if not isinstance(tensor, torch.Tensor):
            raise Rejected(f"{key}: not a tensor")
        if tensor.dtype not in FLOAT_DTYPES:
            raise Rejected(f"{key}: dtype {str(tensor.dtype).removeprefix('torch.')} is not a floating type")
        parts.setdefault(match.group(1), {})[match.group(2).split(".")[0]] = tensor
    modules, ranks = {}, set()
    for name, t in sorted(parts.items()):
        if "lora_A" not in t or "lora_B" not in t:
            raise Rejected(f"module {name!r} lacks lora_A or lora_B")
        A, B, m = t["lora_A"], t["lora_B"], t.get("lora_magnitude_vector")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise Rejected(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not chain")
        if m is not None:
            m = m.reshape(-1)
            if m.shape[0] != B.shape[0]:
                raise Rejected(f"{name}: lora_magnitude_vector has {m.shape[0]} entries, lora_B has {B.shape[0]} rows")
        for tensor, label in ((A, "lora_A"), (B, "lora_B"), (m, "lora_magnitude_vector")):
            if tensor is not None and not torch.isfinite(tensor.float()).all():
                raise Rejected(f"{name}.{label} contains NaN or Inf")
        ranks.add(A.shape[0])
        modules[name] = Module(A.float(), B.float(), None if m is None else m.float())
    if len(ranks) > 1:
        raise Rejected(f"modules have different ranks {sorted(ranks)}; one rank per adapter is required")
    return modules


def signature(modules: dict[str, Module]):
    """What must agree between submissions: module set, delta shapes, DoRA or not."""
    return tuple((n, mod.B.shape[0], mod.A.shape[1], mod.m is not None) for n, mod in modules.items())


def _shape_difference(sig, ref) -> str:
    got, want = {s[0]: s[1:] for s in sig}, {s[0]: s[1:] for s in ref}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        return f"wrong shape: module {missing[0]} is missing ({len(missing)} missing)"
    if extra:
        return f"wrong shape: module {extra[0]} is not in the other submissions"
    for name in want:
        if got[name] != want[name]:
            (o, i, m), (wo, wi, wm) = got[name], want[name]
            if m != wm:
                return f"wrong shape: {name} {'has' if m else 'lacks'} lora_magnitude_vector, unlike the others"
            return f"wrong shape: {name} delta is {o}x{i}, expected {wo}x{wi}"
    return "wrong shape"


def delta(mod: Module, scaling: float) -> torch.Tensor:
    return scaling * (mod.B @ mod.A)  # [out, in]


def _robust_z(values: torch.Tensor) -> torch.Tensor:
    """Modified z-score 0.6745 (x - median) / MAD; falls back to the mean absolute deviation
    (x 1.2533) when more than half the values coincide (MAD = 0)."""
    med = values.median()
    dev = (values - med).abs()
    mad = dev.median()
    if mad > 0:
        return 0.6745 * (values - med) / mad
    mean_ad = dev.mean()
    if mean_ad > 0:
        return (values - med) / (1.253314 * mean_ad)
    return torch.zeros_like(values)


# -- methods: each takes the valid updates and returns ({index: weight}, stacked?) or a dense result
def _weights(indices, weights):
    raw = {i: float(weights[i]) if weights is not None else 1.0 for i in indices}
    total = sum(raw.values())
    return {i: w / total for i, w in raw.items()}


def _pairwise_sq_dist(modules, scalings, indices):
    n = len(indices)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for name in modules[indices[0]]:
        X = torch.stack([torch.cat([delta(modules[i][name], scalings[i]).reshape(-1),
                                    _m(modules[i][name])]) for i in indices]).double()  # [n, d]
        sq = (X * X).sum(1)
        dist += (sq[:, None] + sq[None, :] - 2 * X @ X.T).clamp_min(0)
    return dist


def _m(mod: Module) -> torch.Tensor:
    return mod.m if mod.m is not None else torch.zeros(0)


def _krum_scores(modules, scalings, indices, f):
    n = len(indices)
    dist = _pairwise_sq_dist(modules, scalings, indices)
    closest = max(1, n - f - 2)
    scores = []
    for row in range(n):
        others = torch.cat([dist[row, :row], dist[row, row + 1:]])
        scores.append(float(others.sort().values[:closest].sum()))
    return scores


def _krum_f(n, params):
    f = params.get("f")
    if f is None:
        f = max(0, (n - 3) // 2)  # the most Byzantine miners Krum can tolerate: n >= 2f + 3
    return int(f)


def krum(modules, scalings, indices, weights, report, params):
    if len(indices) == 1:
        return {indices[0]: 1.0}
    scores = _krum_scores(modules, scalings, indices, _krum_f(len(indices), params))
    report.scores = dict(zip(indices, scores))
    best = indices[min(range(len(indices)), key=lambda k: scores[k])]
    for i in indices:
        if i != best:
            report.rejected[i] = f"not selected by Krum (score {report.scores[i]:.4g} > {report.scores[best]:.4g})"
    return {best: 1.0}


def multi_krum(modules, scalings, indices, weights, report, params):
    n = len(indices)
    f = _krum_f(n, params)
    keep = int(params.get("m") or n - f)
    if n == 1:
        return {indices[0]: 1.0}
    scores = _krum_scores(modules, scalings, indices, f)
    report.scores = dict(zip(indices, scores))
    order = sorted(range(n), key=lambda k: scores[k])
    chosen = [indices[k] for k in order[:keep]]
    cutoff = scores[order[keep - 1]]
    for k in order[keep:]:
        report.rejected[indices[k]] = f"not selected by Multi-Krum (score {scores[k]:.4g} > cutoff {cutoff:.4g})"
    return _weights(sorted(chosen), weights)


def mean(modules, scalings, indices, weights, report, params):
    return _weights(indices, weights)


def _coordinate(reduce):
    def method(modules, scalings, indices, weights, report, params):
        out = {}
        for name in modules[indices[0]]:
            D = torch.stack([delta(modules[i][name], scalings[i]) for i in indices])  # [n, out, in]
            M = torch.stack([_m(modules[i][name]) for i in indices])  # [n, out] or [n, 0]
            out[name] = (reduce(D, params), reduce(M, params) if M.shape[1] else None)
        return out

    return method


def _trimmed(X, params):
    n = X.shape[0]
    beta = float(params.get("beta", 0.2))
    cut = int(beta * n)  # as Flower's FedTrimmedAvg: int(beta * n) dropped at each end
    if 2 * cut >= n:
        raise ValueError(f"trimmed mean with beta={beta} would drop all {n} submissions")
    return X.sort(dim=0).values[cut:n - cut].mean(0)


def _median(X, params):
    return X.quantile(0.5, dim=0) if X.numel() <= 16_000_000 else X.sort(dim=0).values[
        [(X.shape[0] - 1) // 2, X.shape[0] // 2]].mean(0)


METHODS = {
    "mean": mean,
    "trimmed_mean": _coordinate(_trimmed),
    "median": _coordinate(_median),
    "krum": krum,
    "multi_krum": multi_krum,
}
STACKED = {"mean", "krum", "multi_krum"}


# -- back to DoRA form -------------------------------------------------------------------------
def _truncate(U, S, Vh, rank: int, scaling: float):
    """Rank-`rank` DoRA factors of U diag(S) Vh / scaling, split as sqrt(S) on each side:
    (A [rank, in], B [out, rank], relative Frobenius error of the truncation); rows past the
    matrix's own rank stay zero."""
    k = min(rank, S.shape[0])
    total = float((S * S).sum())
    err = math.sqrt(float((S[k:] ** 2).sum()) / total) if total > 0 else 0.0
    root = S[:k].sqrt()
    A = torch.zeros(rank, Vh.shape[1], dtype=torch.float64)
    B = torch.zeros(U.shape[0], rank, dtype=torch.float64)
    A[:k] = root[:, None] * Vh[:k]
    B[:, :k] = U[:, :k] * root[None, :] / scaling
    return A.float(), B.float(), err


def _svd_factor(D: torch.Tensor, rank: int, scaling: float):
    """Truncated SVD of a dense delta: (A [rank, in], B [out, rank], relative error)."""
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return _truncate(U, S, Vh, rank, scaling)


def _stacked_factor(parts, scaling):
    """parts: [(weight, scaling_i, Module)] -> exact stacked (A, B) with s * B @ A = sum w_i s_i B_i A_i."""
    A = torch.cat([mod.A for _, _, mod in parts], dim=0)
    B = torch.cat([mod.B * (w * s / scaling) for w, s, mod in parts], dim=1)
    return A, B


def _lowrank_svd(A, B, rank, scaling):
    """Truncated SVD of s * B @ A without forming it (QR of both factors)."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(scaling * Rb @ Ra.T)
    return _truncate(Qb @ U, S, Vh @ Qa.T, rank, scaling)


def to_state_dict(modules: dict[str, Module]) -> dict[str, torch.Tensor]:
    state = {}
    for name, mod in modules.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.A.contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.B.contiguous()
        if mod.m is not None:
            state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = mod.m.contiguous()
    return state


# -- entry point ---------------------------------------------------------------------------------
def aggregate(adapters, method, weights=None, *, base=None, rank=None, z_threshold=3.5, min_ratio=2.0, **params):
    """Aggregate `adapters` — a list of (state_dict, scaling) pairs — with a method of METHODS.

    `weights` (e.g. example counts, one per adapter) weight `mean` and `multi_krum`; the
    coordinate-wise methods are unweighted (a weight would let one miner buy the median).
    `base` is an optional (state_dict, scaling) starting adapter that norms are measured from.
    Returns (aggregated PEFT state dict, Report). Raises ValueError if nothing can be aggregated.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; choose from {', '.join(METHODS)}")
    if weights is not None and len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights given for {len(adapters)} adapters")
    report = Report(method=method)
    modules, scalings = {}, {}
    for i, (state, scaling) in enumerate(adapters):
        try:
            modules[i] = parse_adapter(state, scaling)
            scalings[i] = float(scaling)
        except Rejected as exc:
            report.rejected[i] = str(exc)
        if weights is not None and i in modules:
            w = weights[i]
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                report.rejected[i] = f"weight {w!r} must be a positive number"
                del modules[i]
    if modules:
        sigs = {i: signature(mods) for i, mods in modules.items()}
        reference = Counter(sigs.values()).most_common(1)[0][0]
        for i, sig in sigs.items():
            if sig != reference:
                report.rejected[i] = _shape_difference(sig, reference)
                del modules[i]
    valid = sorted(modules)
    if not valid:
        raise ValueError("no submission can be aggregated: " + "; ".join(
            f"#{i}: {r}" for i, r in sorted(report.rejected.items())))

    # Update norms, measured from the base adapter (or the coordinate-wise median), then the
    # robust z-score filter.
    base_modules = None
    if base is not None:
        base_modules = parse_adapter(*base)
        if signature(base_modules) != signature(modules[valid[0]]):
            raise ValueError("the base adapter's modules and shapes differ from the submissions'")
    sq = {i: 0.0 for i in valid}
    for name in modules[valid[0]]:
        if base_modules is not None:
            ref_d, ref_m = delta(base_modules[name], float(base[1])), _m(base_modules[name])
        else:
            ref_d = torch.stack([delta(modules[i][name], scalings[i]) for i in valid]).median(0).values
            ref_m = torch.stack([_m(modules[i][name]) for i in valid]).median(0).values
        for i in valid:
            d = delta(modules[i][name], scalings[i]) - ref_d
            dm = _m(modules[i][name]) - ref_m
            sq[i] += float((d * d).sum()) + float((dm * dm).sum())
    report.norms = {i: math.sqrt(v) for i, v in sq.items()}
    if len(valid) >= 3:
        norms = torch.tensor([report.norms[i] for i in valid], dtype=torch.float64)
        z = _robust_z(norms)
        median_norm = float(norms.median())
        for i, zi in zip(list(valid), z.tolist()):
            ratio = report.norms[i] / median_norm if median_norm > 0 else math.inf
            # Far outside = statistically (z) AND materially (ratio): with few submissions the MAD
            # is tiny and z alone would flag honest miners whose norms differ by a few percent.
            if abs(zi) > z_threshold and (ratio > min_ratio or ratio < 1 / min_ratio):
                side = "above" if zi > 0 else "below"
                report.rejected[i] = (f"update norm {report.norms[i]:.4g} is far {side} the others "
                                      f"(median {median_norm:.4g}, robust z-score {zi:.1f} > {z_threshold})")
                valid.remove(i)

    chosen = METHODS[method](modules, scalings, valid, weights, report, params)
    scaling = sum(scalings[i] for i in valid) / len(valid)
    out: dict[str, Module] = {}
    errors = [0.0]
    if method in STACKED:
        report.weights = chosen
        report.included = sorted(chosen)
        stack_rank = sum(modules[i][next(iter(modules[i]))].A.shape[0] for i in chosen)
        # A delta never has a rank above min(out, in): past that, stacking only adds zeros' worth
        # of factors, so the (exact) SVD of the stack to that width is used instead.
        widest = max(min(mod.B.shape[0], mod.A.shape[1]) for mod in modules[valid[0]].values())
        out_rank = int(rank) if rank else min(stack_rank, widest)
        for name in modules[valid[0]]:
            parts = [(w, scalings[i], modules[i][name]) for i, w in sorted(chosen.items())]
            A, B = _stacked_factor(parts, scaling)
            if out_rank != stack_rank:
                A, B, err = _lowrank_svd(A, B, out_rank, scaling)
                errors.append(err)
            ms = [w * p.m for w, _, p in parts] if parts[0][2].m is not None else None
            out[name] = Module(A, B, sum(ms) if ms else None)
    else:
        report.included = list(valid)
        report.weights = {i: 1.0 / len(valid) for i in valid}
        first = modules[valid[0]][next(iter(modules[valid[0]]))]
        widest = max(min(D.shape) for D, _ in chosen.values())
        out_rank = int(rank) if rank else min(first.A.shape[0] * len(valid), widest)
        for name, (D, m) in chosen.items():
            A, B, err = _svd_factor(D, min(out_rank, *D.shape), scaling)
            if A.shape[0] < out_rank:  # one rank for every module (PEFT has no per-module rank here)
                A = torch.cat([A, torch.zeros(out_rank - A.shape[0], A.shape[1])])
                B = torch.cat([B, torch.zeros(B.shape[0], out_rank - B.shape[1])], dim=1)
            errors.append(err)
            out[name] = Module(A, B, m)
    report.rank = out_rank
    report.scaling = scaling
    report.alpha = scaling * out_rank
    report.svd_error = max(errors)
    report.exact = report.svd_error < 1e-6
    return to_state_dict(out), report
