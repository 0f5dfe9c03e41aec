"""SPDY: per-layer sparsities that meet a measured speed-up target with the least loss.

Frantar & Alistarh, ICML 2022, "SPDY: Accurate Pruning with Speedup Guarantees" (arXiv 2201.13096). Three parts:

1. **Timings.** Every prunable layer is timed at every sparsity level of the OBC database (``database.py``) with
   the CPU inference engine (``sparsetrain.inference``) at the batch size that will be served: dense
   ``nn.Linear`` against the CSR int32 :class:`~sparsetrain.inference.SparseLinear`, and the layer's time at a
   level is the one of the kernel ``to_sparse_kernels`` would choose there (CSR only when it is at least
   ``margin`` faster, dense below ``min_sparsity``; convolutions have no faster sparse kernel and cost the same at
   every level). The rest of the model (activations, pooling, unpruned layers) is a fixed overhead, timed as the
   model with every timed layer replaced by its recorded output; the dense time is that plus the layers' times.
2. **Dynamic program.** For per-layer weights ``c``, ``allocation.allocate_under_budget`` picks one level per
   layer minimising ``sum_l c_l * error_l(level)`` subject to ``overhead + sum_l time_l(level) <=
   dense time / target``; ``error_l`` is the database's layer-wise error ``||W X - W' X||^2 / N``.
3. **Search over the weights.** The errors of different layers are not comparable measures of what the loss
   loses, so SPDY searches ``c``: each candidate's profile is stitched from the database and scored by the loss
   on the calibration samples. The first candidate is ``c = 1`` (the database errors as they are), then random
   ``c`` uniform in [0, 1]^L, then a local search that resamples a shrinking random subset of the incumbent's
   coordinates and keeps a candidate only when its loss is lower. Every candidate comes from the DP, so every
   profile considered, the returned one included, meets the time budget as predicted.
4. **Calibration on the measured speed-up.** Per-layer times, each layer timed alone with its weights in cache,
   do not add up to the whole model's time (on a wide MLP a profile predicted at 2.2x measured 3.1x). So the
   chosen profile's whole-model speed-up is measured with the inference engine (``to_sparse_kernels``, paired
   timing, median of 3); when it falls outside ``[target, target * (1 + tolerance)]``, the speed-up asked of the
   DP (hence its time budget) is corrected by a secant step in log space inside a bisection bracket and the
   search re-run, a few times at most (:func:`calibrate_to_measured`).

Differences from the paper: the candidate layers come from the OBC database (each layer solved independently by
ExactOBS / SparseGPT on its dense-model inputs) and are scored as stitched, without the paper's per-candidate
layer-wise reconstruction; the loss is taken without batch-norm re-calibration (the caller re-calibrates the
chosen model once); the search is the same shrinking-neighbourhood idea with a budget of ``candidates`` DP solves.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._atomic import write_text_atomic
from ..inference import SparseLinear, _capture_inputs, _ineligible, time_call, time_paired, to_sparse_kernels
from .allocation import allocate_under_budget
from .calibration import ModelInput, collect_batches, concat, index, run_model, sample_count, to_device
from .database import DEFAULT_GRID, ObcDatabase, _build, _calibration_loss, _check_grid

__all__ = ["SpdyTimings", "measure_timings", "search_profile", "prune_spdy", "max_speedup", "measure_speedup",
           "calibrate_to_measured"]

log = logging.getLogger(__name__)

_FORMAT = "sparsetrain-spdy-times-1"


@dataclass
class SpdyTimings:
    """Per-layer times (seconds per call at ``batch_size``) at each level of ``grid``.

    ``times[name][i]`` is the time of the kernel ``kernels[name][i]`` ('csr' or 'dense') that the inference engine
    uses for layer ``name`` at sparsity ``grid[i]``; ``overhead`` the time of the rest of the model; ``dense_total``
    the overhead plus every layer's dense time (the predicted dense time). ``source`` is 'measured' or 'cache'.
    """

    batch_size: int
    threads: int
    grid: tuple[float, ...]
    names: list[str]
    times: dict[str, list[float]] = field(default_factory=dict)
    kernels: dict[str, list[str]] = field(default_factory=dict)
    dense_total: float = 0.0
    overhead: float = 0.0
    key: str = ""
    source: str = "measured"

    def predict(self, levels: Sequence[int]) -> float:
        """The predicted time of the model with each layer at its level (same order as ``names``)."""
        return self.overhead + sum(self.times[n][lv] for n, lv in zip(self.names, levels))

    def fastest(self) -> list[int]:
        """The level with the least time of each layer."""
        return [min(range(len(self.grid)), key=lambda i, n=n: self.times[n][i]) for n in self.names]


def max_speedup(timings: SpdyTimings) -> float:
    """The predicted speed-up of the fastest profile (every layer at its fastest level): the most a target can be."""
    return timings.dense_total / timings.predict(timings.fastest())


class _Keywords(nn.Module):
    """Calls ``model(**x)``: the timing code passes one positional sample, a mapping sample (the Hugging Face
    form) is the model's keyword arguments."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Mapping[str, Any]) -> Any:
        return self.model(**x)


def _positional(model: nn.Module, sample: ModelInput) -> nn.Module:
    """``model``, or for a mapping sample the module that calls it with the mapping's keyword arguments."""
    return _Keywords(model) if isinstance(sample, Mapping) else model


def _sample_shape(sample: ModelInput) -> list[Any]:
    if isinstance(sample, Tensor):
        return [list(sample.shape), str(sample.dtype)]
    return [[k, list(v.shape), str(v.dtype)] if isinstance(v, Tensor) else [k, repr(v)]
            for k, v in sorted(sample.items())]


class _Canned(nn.Module):
    """Stands in for a timed layer when the rest of the model is timed: returns the output it recorded."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.output


def _overhead(model: nn.Module, modules: Sequence[nn.Module], sample: ModelInput, repeats: int,
              min_time: float) -> float:
    """Seconds per call of everything in ``model(sample)`` but ``modules``: the model timed with each of them
    replaced by its recorded output (a subtraction of two noisy totals could be anything)."""
    outputs: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module not in outputs and isinstance(output, Tensor):
            outputs[module] = output.detach().clone()

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.inference_mode():
            run_model(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    swapped = {m: _Canned(out) for m, out in outputs.items()}
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in model.modules():
            for child_name, child in list(parent._modules.items()):
                if child in swapped:
                    originals.append((parent, child_name, child))
                    parent._modules[child_name] = swapped[child]
        return time_call(functools.partial(run_model, model, sample), repeats=repeats, min_time=min_time)
    finally:  # the model is the caller's: every layer goes back where it was
        for parent, child_name, child in originals:
            parent._modules[child_name] = child


def _timings_key(db: ObcDatabase, sample: ModelInput, margin: float, min_sparsity: float) -> str:
    # Times belong to this machine, thread count and torch build as much as to the layers: all in the key.
    parts = [_FORMAT, db.key, *_sample_shape(sample), torch.get_num_threads(), torch.__version__,
             platform.node(), platform.machine(), platform.processor(), os.cpu_count(), margin, min_sparsity]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _load_timings(path: str | os.PathLike[str], key: str, db: ObcDatabase) -> SpdyTimings | None:
    try:
        with open(path) as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("key") != key:
            return None
        t = SpdyTimings(int(data["batch_size"]), int(data["threads"]), tuple(float(s) for s in data["grid"]),
                        [str(n) for n in data["names"]], key=key, source="cache")
        if t.names != db.names or t.grid != db.grid:
            return None
        for name in t.names:
            times = [float(x) for x in data["times"][name]]
            kernels = [str(k) for k in data["kernels"][name]]
            if (len(times) != len(t.grid) or len(kernels) != len(t.grid)
                    or not all(math.isfinite(x) and x > 0 for x in times) or not set(kernels) <= {"csr", "dense"}):
                return None
            t.times[name], t.kernels[name] = times, kernels
        t.dense_total, t.overhead = float(data["dense_total"]), float(data["overhead"])
        if not (math.isfinite(t.dense_total) and t.dense_total > 0 and math.isfinite(t.overhead) and t.overhead >= 0):
            return None
        return t
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.info("SPDY timings %s not used (%s); timing again", path, error)
        return None


@torch.no_grad()
def measure_timings(
    model: nn.Module,
    db: ObcDatabase,
    sample: ModelInput,
    *,
    margin: float = 0.05,
    min_sparsity: float = 0.5,
    repeats: int = 5,
    min_time: float = 1e-3,
    cache: str | os.PathLike[str] | None = None,
) -> SpdyTimings:
    """Time every layer of ``db`` at every level on the input it receives for ``sample`` (SPDY's timing table).

    Each level is timed with the database's own weights for it: dense against CSR, paired and interleaved, the
    median of ``repeats`` (cheap: a few milliseconds per level), with ``to_sparse_kernels``'s rule and defaults
    (``margin``, ``min_sparsity``) deciding which of the two the level costs. ``model`` is not changed.

    Args:
        model: the dense model the database was built from (put in eval mode here, modes restored).
        db: its OBC database.
        sample: a batch shaped as served; its first dimension is the batch size the times are for. A mapping
            (the Hugging Face form) is passed as keyword arguments, ``model(**sample)``.
        margin, min_sparsity: as ``sparsetrain.inference.to_sparse_kernels``.
        repeats, min_time: timing repeats (median) and least seconds per repeat.
        cache: a JSON file: used when it holds the times of this database, sample shape, machine and torch build,
            else (re)written.
    """
    key = _timings_key(db, sample, margin, min_sparsity)
    if cache is not None and os.path.isfile(cache):
        cached = _load_timings(cache, key, db)
        if cached is not None:
            log.info("SPDY timings loaded from %s", cache)
            return cached
    batch = sample_count(sample) if isinstance(sample, Mapping) or sample.dim() > 1 else 1
    out = SpdyTimings(batch, torch.get_num_threads(), db.grid, list(db.names), key=key)
    modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in db.names}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        inputs = _capture_inputs(_positional(model, sample), (sample,), list(modules.values()))
        with torch.inference_mode():
            layer_dense = 0.0
            for name, module in modules.items():
                x = inputs.get(module)
                if x is None:  # not reached by this sample: costs nothing here, so its level is free
                    out.times[name] = [1e-12] * len(db.grid)
                    out.kernels[name] = ["dense"] * len(db.grid)
                    continue
                dense = time_call(functools.partial(module, x), repeats=repeats, min_time=min_time)
                layer_dense += dense
                times, kernels = [], []
                for weight in db.weights[name]:
                    sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())
                    if not isinstance(module, nn.Linear) or _ineligible(module, x, min_sparsity, sparsity):
                        times.append(dense)
                        kernels.append("dense")
                        continue
                    twin = copy.copy(module)
                    twin._parameters = {**module._parameters, "weight": nn.Parameter(weight, requires_grad=False)}
                    sparse = SparseLinear(weight, module.bias)
                    t_dense, t_sparse = time_paired([functools.partial(twin, x), functools.partial(sparse, x)],
                                                    repeats=repeats, min_time=min_time)
                    if t_sparse <= (1.0 - margin) * t_dense:
                        # The paired ratio, on the layer's one dense time: drift between levels cancels out. A
                        # sparser CSR level cannot really be slower than a denser one: that is noise, capped.
                        ratio = t_sparse / t_dense
                        csr = [t for t, k in zip(times, kernels) if k == "csr"]
                        times.append(min([dense * ratio, *csr]))
                        kernels.append("csr")
                    else:
                        times.append(dense)
                        kernels.append("dense")
                out.times[name], out.kernels[name] = times, kernels
                log.info("SPDY timings: %s %s", name, ", ".join(f"{s:g}:{t * 1e6:.0f}us({k})" for s, t, k in
                                                                zip(db.grid, times, kernels)))
            out.overhead = _overhead(model, list(modules.values()), sample, max(repeats, 5), min_time)
            out.dense_total = out.overhead + layer_dense
    finally:
        for m, training in modes.items():
            m.train(training)
    if cache is not None:
        try:
            write_text_atomic(cache, json.dumps({"format": _FORMAT, **asdict(out), "source": "measured"}))
        except Exception as error:  # noqa: BLE001 - a cache that cannot be written costs a re-timing, nothing else
            log.warning("SPDY timings not cached at %s: %s", cache, error)
    return out


def search_profile(
    errors: Sequence[Sequence[float]],
    times: Sequence[Sequence[float]],
    budget: float,
    score: Callable[[list[int]], float],
    *,
    candidates: int = 100,
    seed: int = 0,
    buckets: int = 1000,
    progress: bool = False,
    history: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[float], float]:
    """SPDY's search over per-layer error weights (Frantar & Alistarh 2022, arXiv 2201.13096, section 3.3).

    Each candidate weight vector ``c`` gives a profile through the DP (``allocate_under_budget`` on
    ``c_l * errors[l]`` and ``times`` under ``budget``), scored by ``score(profile)`` (lower is better; equal
    profiles are scored once). Candidates: ``c = 1``, then about a fifth of the budget uniform at random in
    [0, 1]^L, then a local search from the best so far that resamples ``k`` random coordinates, ``k`` shrinking
    from half the layers to one over the remaining candidates.

    Args:
        errors: per layer, the error of each level.
        times: per layer, the time of each level.
        budget: the largest total layer time allowed.
        score: the loss of a profile (list of level indices).
        candidates: how many weight vectors are tried (DP solves), >= 1.
        seed: seed of the search's own ``torch.Generator``.
        buckets: the DP's time resolution.
        progress: show a progress bar (tqdm, on stderr).
        history: if given, one dict per candidate is appended (``levels``, ``score``, ``accepted``).

    Returns:
        ``(levels, weights, score)`` of the best candidate; its total time is at most ``budget``.

    Raises:
        ValueError: ``candidates`` < 1, or as ``allocate_under_budget`` (a budget no profile meets).
    """
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive integer (e.g. 100), got {candidates!r}")
    layers = len(errors)
    generator = torch.Generator().manual_seed(seed)
    scored: dict[tuple[int, ...], float] = {}
    best: tuple[list[int], list[float], float] | None = None
    randoms = candidates // 5
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=candidates, desc="SPDY search", leave=False, dynamic_ncols=True)
    try:
        for step in range(candidates):
            if step == 0 or best is None:
                weights = [1.0] * layers
            elif step <= randoms:
                weights = torch.rand(layers, generator=generator, dtype=torch.float64).tolist()
            else:
                fraction = 1.0 - (step - randoms - 1) / max(1, candidates - randoms - 1)
                k = max(1, round(0.5 * layers * fraction))
                weights = list(best[1])
                for i in torch.randperm(layers, generator=generator)[:k].tolist():
                    weights[i] = float(torch.rand((), generator=generator, dtype=torch.float64))
            levels = allocate_under_budget([[c * float(e) for e in row] for c, row in zip(weights, errors)],
                                           times, budget, buckets=buckets)
            key = tuple(levels)
            if key not in scored:
                scored[key] = float(score(levels))
            value = scored[key]
            accepted = best is None or value < best[2]
            if accepted:
                best = (levels, weights, value)
            if history is not None:
                history.append({"levels": levels, "score": value, "accepted": accepted})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{best[2]:.4g}")
    finally:
        if bar is not None:
            bar.close()
    assert best is not None
    return best


@torch.no_grad()
def measure_speedup(dense: nn.Module, pruned: nn.Module, sample: ModelInput, *, repeats: int = 3,
                    min_time: float = 2e-2) -> float:
    """The measured whole-model speed-up of ``pruned`` over ``dense`` on ``sample`` with the inference engine.

    ``pruned`` is converted with ``to_sparse_kernels`` at the sample's batch size (CSR where it is measured
    faster), then ``dense(sample)`` and the converted model are timed paired and interleaved
    (``time_paired``, 3 interleaved repeats of loops lasting ``min_time``); the result is the median over
    ``repeats`` of the ratio dense time / sparse time. Neither model is changed. Put both in eval mode first, as
    for inference.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    converted, _ = to_sparse_kernels(_positional(pruned, sample), sample)
    dense = _positional(dense, sample)
    ratios = []
    with torch.inference_mode():
        for _ in range(repeats):
            t_dense, t_sparse = time_paired([functools.partial(dense, sample), functools.partial(converted, sample)],
                                            repeats=3, min_time=min_time)
            ratios.append(t_dense / t_sparse)
    return statistics.median(ratios)


def calibrate_to_measured(
    solve: Callable[[float], tuple[list[int], float, float]],
    measure: Callable[[list[int]], float],
    target: float,
    *,
    tolerance: float = 0.1,
    steps: int = 5,
    most: float = math.inf,
    evaluate: Callable[[list[int]], tuple[float, float]] | None = None,
    refine_steps: int = 3,
) -> tuple[int, list[dict[str, Any]], str]:
    """Correct the speed-up asked of SPDY's search until the chosen profile's *measured* speed-up is on target.

    The loop is kept apart from timing so that it can be checked with any ``measure``. Step 1 asks ``solve`` for
    ``target`` itself. Each later step asks for a corrected speed-up ``a``: a secant step in log space through the
    last two (predicted, measured) points aimed at the window's geometric middle (the first correction assumes
    measured / predicted stays constant), kept strictly inside the bracket of what is known (above every ``a``, and
    every predicted speed-up, of a profile measured below ``target``; below every ``a`` whose profile measured
    above the window), else, and after a search that found a profile already measured, the bracket's geometric
    middle. A profile already measured is not measured again.

    It stops when a profile lands in the window ``[target, target * (1 + tolerance)]``, after ``steps`` searches,
    when the bracket is narrower than a tenth of the window, or after two searches in a row found only profiles
    already measured (then the neighbouring profiles jump over the window).

    Then, with ``evaluate`` and no profile in the window, it bisects *between profiles*: the fastest profile
    measured below the target and the slowest measured above the window differ in some layers' levels; the profile
    halfway between them, level by level (a grid level the search never chose when two levels were timed alike),
    is scored and measured, and replaces the end it falls beyond, at most ``refine_steps`` times or until the two
    ends are neighbouring levels.

    Args:
        solve: ``solve(a) -> (levels, loss, predicted)``: the search for a predicted speed-up of ``a``, ``1 <= a
            <= most``: its profile (level per layer), its calibration loss and its predicted speed-up.
        measure: ``measure(levels) -> measured speed-up`` of that profile.
        target: the speed-up to meet, > 1.
        tolerance: the window's relative width above ``target`` (> 0).
        steps: the most searches, >= 1.
        most: the largest speed-up ``solve`` accepts (the fastest profile's predicted speed-up).
        evaluate: ``evaluate(levels) -> (loss, predicted)`` of any profile, for the bisection between profiles
            (none without it).
        refine_steps: the most profiles that bisection measures, >= 0.

    Returns:
        ``(chosen, entries, outcome)``: ``entries`` holds one dict per step (``step``, ``asked``, ``levels``,
        ``loss``, ``predicted``, ``measured``, ``in_window``, ``repeat``, ``refined``: from the bisection between
        profiles, whose ``asked`` is that of the end above the window); ``chosen`` indexes the profile kept:
        the least loss among those in the window; if none is, the least loss among those measured at or above
        ``target`` (a profile measured below the target is never kept while one above it exists); if none meets
        it, the fastest measured. ``outcome`` says which, in words.
    """
    if not (math.isfinite(target) and target > 1):
        raise ValueError(f"the target speed-up must be a number > 1, got {target!r}")
    if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)
                                           and tolerance > 0):
        raise ValueError(f"tolerance must be a number > 0 (e.g. 0.1 for a window of 10% above the target), got "
                         f"{tolerance!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (e.g. 5), got {steps!r}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be an integer >= 0 (e.g. 3), got {refine_steps!r}")
    upper = target * (1.0 + tolerance)
    middle = math.sqrt(target * upper)
    low, high = 1.0, most  # the asked speed-up that lands in the window lies in (low, high]
    measured_of: dict[tuple[int, ...], float] = {}
    entries: list[dict[str, Any]] = []
    asked = min(target, most)
    for step in range(1, steps + 1):
        levels, loss, predicted = solve(asked)
        key = tuple(levels)
        repeat = key in measured_of
        if not repeat:
            measured_of[key] = float(measure(list(levels)))
        measured = measured_of[key]
        inside = target <= measured <= upper
        entries.append({"step": step, "asked": asked, "levels": list(levels), "loss": float(loss),
                        "predicted": float(predicted), "measured": measured, "in_window": inside,
                        "repeat": repeat})
        if inside:
            break
        if measured < target:
            # Any budget that still fits this profile gives it again (the DP found it best under a larger one):
            # asking for up to its own predicted speed-up is wasted.
            low = max(low, asked, min(predicted, most))
        else:
            high = min(high, asked)
        if high <= low * (1.0 + tolerance / 10):
            # Budgets this close give profiles whose speed differs far less than the window is wide: the two ends
            # are neighbouring profiles that jump over it.
            break
        if repeat and len(entries) >= 2 and entries[-2]["repeat"]:
            break  # two searches in a row found nothing new between the ends: the profiles jump over the window
        # The search may return a profile predicted well above what was asked (the DP's levels are a staircase):
        # the model of the machine is measured against predicted, so the correction is on the prediction.
        proposal = predicted * middle / measured  # measured / predicted taken as constant
        points = [(e["predicted"], e["measured"]) for e in entries[-2:]]
        if not repeat and len(points) == 2 and points[0][0] != points[1][0] and points[0][1] != points[1][1]:
            (a0, m0), (a1, m1) = points
            slope = (math.log(m1) - math.log(m0)) / (math.log(a1) - math.log(a0))
            if math.isfinite(slope) and slope > 0:  # noise can make it run backwards: then the ratio step
                proposal = math.exp(math.log(a1) + (math.log(middle) - math.log(m1)) / slope)
        proposal = min(proposal, most)
        fastest_untried = proposal == high == most and all(e["asked"] != most for e in entries)
        near = 1.0 + tolerance / 20  # a proposal this close to an end of the bracket would only repeat that end
        if not (low * near < proposal < high / near or fastest_untried):
            proposal = math.sqrt(low * high) if math.isfinite(high) else 2.0 * low
        if proposal == asked:
            break
        asked = proposal
    for entry in entries:
        entry["refined"] = False
    for _ in range(refine_steps if evaluate is not None else 0):
        if any(e["in_window"] for e in entries):
            break
        below = [e for e in entries if e["measured"] < target]
        above = [e for e in entries if e["measured"] > upper]
        if not below or not above:
            break
        slow = max(below, key=lambda e: e["measured"])
        fast = min(above, key=lambda e: e["measured"])
        halfway = [(a + b) // 2 if a <= b else (a + b + 1) // 2 for a, b in zip(slow["levels"], fast["levels"])]
        if tuple(halfway) in measured_of:
            break  # the two ends are neighbouring levels: nothing lies between them
        loss, predicted = evaluate(list(halfway))
        measured = measured_of[tuple(halfway)] = float(measure(list(halfway)))
        entries.append({"step": len(entries) + 1, "asked": fast["asked"], "levels": halfway, "loss": float(loss),
                        "predicted": float(predicted), "measured": measured,
                        "in_window": target <= measured <= upper, "repeat": False, "refined": True})
    inside = [i for i, e in enumerate(entries) if e["in_window"]]
    meeting = [i for i, e in enumerate(entries) if e["measured"] >= target]
    if inside:
        chosen = min(inside, key=lambda i: (entries[i]["loss"], entries[i]["measured"]))
        outcome = f"measured {entries[chosen]['measured']:.2f}x, in the window [{target:g}, {upper:.3g}]x"
    elif meeting:
        chosen = min(meeting, key=lambda i: (entries[i]["loss"], entries[i]["measured"]))
        outcome = (f"window [{target:g}, {upper:.3g}]x not reached in {len(entries)} step(s): kept the profile of "
                   f"least loss among those measured above the target ({entries[chosen]['measured']:.2f}x)")
    else:
        chosen = max(range(len(entries)), key=lambda i: (entries[i]["measured"], -entries[i]["loss"]))
        outcome = (f"window [{target:g}, {upper:.3g}]x not reached in {len(entries)} step(s): no profile measured "
                   f"at the target; kept the fastest measured ({entries[chosen]['measured']:.2f}x)")
    return chosen, entries, outcome


def _check_target(target_speedup: float) -> float:
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or not (
            math.isfinite(target_speedup) and target_speedup > 1):
        raise ValueError(f"the target speed-up must be a number > 1 (e.g. 2.0 for twice as fast), "
                         f"got {target_speedup!r}")
    return float(target_speedup)


@torch.no_grad()
def prune_spdy(
    model: nn.Module,
    target_speedup: float,
    calibration_batches: Iterable[Any],
    *,
    batch_size: int = 1,
    num_samples: int | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    damping: float = 0.01,
    grid: Sequence[float] = DEFAULT_GRID,
    database: ObcDatabase | str | os.PathLike[str] | None = None,
    timings: SpdyTimings | str | os.PathLike[str] | None = None,
    candidates: int = 100,
    seed: int = 0,
    buckets: int = 1000,
    measure: bool = True,
    calibrate: bool = True,
    tolerance: float = 0.1,
    calibration_steps: int = 5,
    progress: bool = False,
    report: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Prune ``model`` **in place** to a per-layer profile chosen by SPDY (Frantar & Alistarh, ICML 2022,
    "SPDY: Accurate Pruning with Speedup Guarantees", arXiv 2201.13096) for ``target_speedup`` at ``batch_size``.

    Builds (or loads) the OBC database of the model's Linear/Conv2d weights (SparseGPT for layers too wide for
    ExactOBS), times each layer at each level with the CPU inference engine at ``batch_size``, and searches the
    per-layer error weights whose DP profile has the least calibration loss among those predicted to run at
    least ``target_speedup`` times faster than the dense model. The model is stitched from the database at the
    chosen profile. The speed-up is then measured on the whole pruned model converted with ``to_sparse_kernels``
    (:func:`measure_speedup`: paired timing against the dense model, median of 3) and, with ``calibrate``, the
    search is re-run with a corrected time budget until that measured speed-up lies in ``[target_speedup,
    target_speedup * (1 + tolerance)]`` (:func:`calibrate_to_measured`): per-layer times, each layer timed alone,
    do not add up to the whole model's time, so the predicted speed-up alone can miss the target either way.

    Args:
        model: the trained dense model.
        target_speedup: > 1; the dense model's predicted time divided by the pruned one's is at least this.
        calibration_batches: training batches (tensors, ``(inputs, targets, ...)`` or Hugging Face mappings run as
            ``model(**batch)`` without ``labels``, which are the targets); never the test set. With class labels
            or next-token targets the search's loss is cross-entropy (a Hugging Face model's own loss on its
            ``labels``), else the squared distance to the dense outputs.
        batch_size: the batch size to serve, which the timings are taken at (the best kernel depends on it).
        num_samples: use at most this many calibration samples.
        include / exclude: glob patterns over parameter names (the layers that may be pruned).
        damping: OBC's Hessian damping.
        grid: the database sparsities (the levels each layer may take).
        database: a built ``ObcDatabase`` of this model and calibration set, or its cache file.
        timings: ``SpdyTimings`` of this database at ``batch_size``, or a JSON cache file for them.
        candidates: the search's budget of weight vectors (DP solves).
        seed: the search's seed.
        buckets: the DP's time resolution.
        measure: also measure the pruned model's speed-up (``report['measured_speedup']``).
        calibrate: with ``measure``, correct the time budget on the measured speed-up: at most
            ``calibration_steps`` searches, each with its own budget; the profile kept is the least-loss one
            measured in the window, else the least-loss one measured at or above the target (never one measured
            below it while one above exists), else the fastest measured (logged as a warning).
        tolerance: the window's relative width above the target (0.1: a 2x target accepts 2.0-2.2x measured).
        calibration_steps: the most searches of the calibration (the first is the uncalibrated one), >= 1.
        progress: progress bars (database build, search) on stderr.
        report: if given, filled with ``levels`` (name -> the database level's sparsity), ``sparsity`` (name ->
            the fraction of zeros the layer holds after pruning: more than its level where the model had more
            zeros there already, e.g. pruned before), ``layer_errors``, ``times`` (name -> seconds
            at the chosen level), ``kernels``, ``predicted_speedup``, ``measured_speedup`` (None if not
            measured), ``max_speedup``, ``calibration_loss`` (``{'dense errors': c = 1 profile, 'chosen': ...}``),
            ``candidates``, ``database`` and ``timings`` ('built'/'cache', 'measured'/'cache'), and
            ``calibration`` (None without it): ``window``, ``reached``, ``outcome`` (in words), ``chosen`` (index)
            and ``steps``, one dict per search (``asked`` speed-up, ``budget_scale`` = its layer-time budget over
            the uncalibrated one, ``levels`` name -> sparsity, ``predicted``, ``measured``, ``loss``).

    Returns:
        The masks of the pruned layers (parameter name -> bool, True = kept).

    Raises:
        ValueError: a target <= 1 or one the fastest profile cannot reach (the message names the reachable
            maximum), a bad batch size, grid, pattern or candidate budget, no calibration data, no Linear/Conv2d
            weight to prune.
    """
    target = _check_target(target_speedup)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive integer (e.g. 100), got {candidates!r}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (e.g. 0.01), got {damping!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a number > 0 (e.g. 0.1 for a window of 10% above the target), got "
                         f"{tolerance!r}")
    if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int) or calibration_steps < 1:
        raise ValueError(f"calibration_steps must be a positive integer (e.g. 5), got {calibration_steps!r}")
    grid = _check_grid(grid)
    inputs, targets = collect_batches(calibration_batches, num_samples)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        device = next(model.parameters()).device
        db = database if isinstance(database, ObcDatabase) else _build(
            model, inputs, grid, include, exclude, damping, database, "auto", progress)
        pool = concat([to_device(x, torch.device("cpu")) for x in inputs])
        # Repeated if fewer samples than that.
        sample = to_device(index(pool, torch.arange(batch_size) % sample_count(pool)), device)
        times = timings if isinstance(timings, SpdyTimings) else measure_timings(model, db, sample, cache=timings)
        if times.names != db.names or times.grid != db.grid:
            raise ValueError("the timings do not describe this database's layers and grid")
        reachable = max_speedup(times)
        if reachable <= 1.0:
            raise ValueError(f"target speed-up {target:g}x is out of reach at batch size {batch_size}: no profile "
                             f"is predicted faster than dense on this machine (the fastest reaches "
                             f"{reachable:.2f}x: the CSR kernel does not beat dense on these layers)")
        if target > reachable:
            raise ValueError(f"target speed-up {target:g}x is out of reach at batch size {batch_size}: the fastest "
                             f"profile (every layer at its fastest level up to sparsity {grid[-1]:g}) is predicted "
                             f"at {reachable:.2f}x on this machine; ask for at most "
                             f"{math.floor(reachable * 100) / 100:g}")
        nominal = times.dense_total / target - times.overhead
        least = sum(min(times.times[n]) for n in db.names)
        reference = [run_model(model, to_device(x, device)) for x in inputs]
        work = copy.deepcopy(model)
        params = dict(work.named_parameters())

        def stitch(levels: Sequence[int], into: dict[str, Tensor]) -> None:
            for name, level in zip(db.names, levels):
                into[name].copy_(db.weights[name][level].to(into[name].device))

        def score(levels: list[int]) -> float:
            stitch(levels, params)
            return _calibration_loss(work, inputs, targets, reference)

        errors = [db.errors[n].tolist() for n in db.names]
        layer_times = [times.times[n] for n in db.names]
        histories: dict[float, list[dict[str, Any]]] = {}

        def budget_for(asked: float) -> float:
            # At the fastest profile the budget is its own time (rounding must not make it unreachable).
            return max(times.dense_total / asked - times.overhead, least)

        def solve(asked: float) -> tuple[list[int], float, float]:
            history = histories.setdefault(asked, [])
            levels, _, loss = search_profile(errors, layer_times, budget_for(asked), score, candidates=candidates,
                                             seed=seed, buckets=buckets, progress=progress, history=history)
            return levels, loss, times.dense_total / times.predict(levels)

        def measure_profile(levels: list[int]) -> float:
            stitch(levels, params)
            return measure_speedup(model, work, sample)  # ``model`` is still the dense one

        calibration: dict[str, Any] | None = None
        if measure and calibrate:
            def evaluate(levels: list[int]) -> tuple[float, float]:
                return score(levels), times.dense_total / times.predict(levels)

            chosen, steps, outcome = calibrate_to_measured(solve, measure_profile, target, tolerance=tolerance,
                                                           steps=calibration_steps, most=reachable, evaluate=evaluate)
            for entry in steps:
                log.info("SPDY calibration step %d: asked %.3gx (budget x%.3f), profile %s, predicted %.2fx, "
                         "measured %.2fx, loss %.4g%s", entry["step"], entry["asked"],
                         budget_for(entry["asked"]) / nominal, [db.grid[lv] for lv in entry["levels"]],
                         entry["predicted"], entry["measured"], entry["loss"], " (profile seen before)"
                         if entry["repeat"] else " (between two measured profiles)" if entry["refined"] else "")
            reached = steps[chosen]["in_window"]
            (log.info if reached else log.warning)("SPDY calibration: %s", outcome)
            levels, loss, measured = steps[chosen]["levels"], steps[chosen]["loss"], steps[chosen]["measured"]
            history = histories[steps[chosen]["asked"]]
            calibration = {
                "window": [target, target * (1.0 + tolerance)], "reached": reached, "outcome": outcome,
                "chosen": chosen,
                "steps": [{"step": e["step"], "asked": e["asked"], "budget_scale": budget_for(e["asked"]) / nominal,
                           "levels": {n: db.grid[lv] for n, lv in zip(db.names, e["levels"])},
                           "predicted": e["predicted"], "measured": e["measured"], "loss": e["loss"],
                           "in_window": e["in_window"], "refined": e["refined"]} for e in steps],
            }  # fmt: skip
        else:
            levels, loss, _ = solve(target)
            history = histories[target]
            measured = measure_profile(levels) if measure else None
        stitch(levels, dict(model.named_parameters()))
        masks = {n: dict(model.named_parameters())[n] != 0 for n in db.names}
        predicted = times.dense_total / times.predict(levels)
        log.info("SPDY: target %.2fx, predicted %.2fx, measured %s, calibration loss %.4g after %d candidates",
                 target, predicted, "-" if measured is None else f"{measured:.2f}x", loss, candidates)
    finally:
        for m, training in modes.items():
            m.train(training)
    if report is not None:
        report.update(
            levels={n: db.grid[lv] for n, lv in zip(db.names, levels)},
            # Counted in the pruned weights: a level is the least sparsity, a layer pruned before may hold more.
            sparsity={n: 1.0 - float(masks[n].sum()) / masks[n].numel() for n in db.names},
            layer_errors={n: float(db.errors[n][lv]) for n, lv in zip(db.names, levels)},
            times={n: times.times[n][lv] for n, lv in zip(db.names, levels)},
            kernels={n: times.kernels[n][lv] for n, lv in zip(db.names, levels)},
            solvers=dict(db.solvers),
            predicted_speedup=predicted, measured_speedup=measured, max_speedup=reachable, target_speedup=target,
            batch_size=batch_size, calibration_loss={"dense errors": history[0]["score"], "chosen": loss},
            candidates=len(history), database=db.source, timings=times.source, calibration=calibration,
        )
    return masks
