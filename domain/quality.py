"""Model quality from mergeable counts: accuracy, per-class precision/recall/F1, calibration (ECE),
Brier score, label coverage, and drift between two distributions. Pure.

A prediction's counts depend only on its output and its current label (`from_prediction`), so a
projection can keep them per prediction (rewritten when a label arrives, changes or is withdrawn)
and sum them per (model, time bucket); any window of buckets is `merge`d, then `quality_report`
turns it into numbers. Counts are exact integers; the two float
sums (`bin_confidence_sums`, `brier_sum`) are associative up to floating-point rounding only.

Definitions (K classes; only made predictions with a current label enter the labelled metrics):
- confusion C[true][predicted]; accuracy = trace(C) / labelled.
- precision_k = C[k][k] / column sum k, recall_k = C[k][k] / row sum k,
  F1_k = 2 C[k][k] / (row sum k + column sum k), which is the harmonic mean of precision and
  recall wherever both exist, and 0 (not undefined) when the class occurs or is predicted but never
  correctly; scikit-learn computes F1 this way too (scikit-learn#27189, #27577).
  Each is None, not 0, where its denominator is 0; macro F1 averages the classes whose F1 exists
  (those that occur or are predicted: scikit-learn's "macro" over the labels present).
- ECE (Guo et al. 2017) = sum_b (n_b / N) |acc_b - conf_b| over 10 equal-width bins of the top
  confidence max_k p_k: bin i holds [i/10, (i+1)/10), the last one also 1.0.
- Brier (Brier 1950) = mean over labelled predictions of sum_k (p_k - y_k)^2, in [0, 2]: the
  multiclass form, scikit-learn's brier_score_loss(..., scale_by_half=False). A scalar (sigmoid)
  output [p] is the two-class vector [1 - p, p], so its score is twice the binary (p - y)^2.
- label coverage = labelled / made predictions.
The predicted class is `domain.model_port.likely_class` of the recorded output, so "correct" here
agrees with `domain.labels.is_correct`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence

import msgspec

from domain.model_port import likely_class

BINS = 10
# Float edges i/10, compared directly, so 0.1 lands in bin 1 and 0.3 in bin 3 (int(c * 10) would
# depend on how c * 10 rounds).
_EDGES = tuple(i / BINS for i in range(BINS + 1))
PSI_EPSILON = 1e-4


class QualityCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Sufficient statistics of one model's predictions over some span; summed by `add`/`merge`.

    `predictions` counts made ones; a failed prediction counts in `failed` (and `labelled_failed`
    when it has a label) and nowhere else. The `bin_*` lists are the calibration bins of labelled
    predictions; `predicted_class_counts` and `confidence_histogram` cover every made prediction,
    labelled or not, for drift before labels arrive.
    """

    num_classes: int
    predictions: int
    failed: int
    labelled: int
    labelled_failed: int
    correct: int
    confusion: list[list[int]]  # [true label][predicted class]
    bin_counts: list[int]
    bin_confidence_sums: list[float]
    bin_correct: list[int]
    brier_sum: float
    predicted_class_counts: list[int]
    confidence_histogram: list[int]


class QualityReport(msgspec.Struct, frozen=True, kw_only=True):
    """The metrics of a `QualityCounts`; None wherever a denominator is 0 (see the module docstring)."""

    num_classes: int
    predictions: int
    failed: int
    labelled: int
    labelled_failed: int
    accuracy: float | None
    precision: list[float | None]
    recall: list[float | None]
    f1: list[float | None]
    macro_f1: float | None
    ece: float | None
    brier: float | None
    label_coverage: float | None


class Drift(msgspec.Struct, frozen=True, kw_only=True):
    """How far `current` moved from `reference`; None where either side is empty."""

    predicted_class_psi: float | None
    predicted_class_js: float | None
    confidence_psi: float | None
    confidence_js: float | None


def empty(num_classes: int) -> QualityCounts:
    """The identity of `add` for a model with `num_classes` classes."""
    if num_classes < 2:
        raise ValueError("a model has at least two classes")
    k = num_classes
    return QualityCounts(
        num_classes=k, predictions=0, failed=0, labelled=0, labelled_failed=0, correct=0,
        confusion=[[0] * k for _ in range(k)], bin_counts=[0] * BINS, bin_confidence_sums=[0.0] * BINS,
        bin_correct=[0] * BINS, brier_sum=0.0, predicted_class_counts=[0] * k, confidence_histogram=[0] * BINS,
    )


def confidence_bin(confidence: float) -> int:
    """The bin of a top confidence in [0, 1]: i for [i/10, (i+1)/10), and 1.0 in the last one."""
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"a confidence lies in [0, 1], not {confidence!r}")
    return min(bisect_right(_EDGES, confidence) - 1, BINS - 1)


def from_prediction(
    probabilities: Sequence[float] | None, label: int | None, failed: bool = False, *, num_classes: int | None = None,
) -> QualityCounts:
    """The counts of one prediction, so a projection adds one row per event.

    `probabilities` is the recorded output: K >= 2 values (taken as probabilities, not
    renormalised), or one sigmoid value p, read as [1 - p, p]. A failed prediction has no output:
    pass `num_classes`. `label` is the current label, or None.
    """
    if failed:
        if num_classes is None:
            if not probabilities:
                raise ValueError("a failed prediction needs num_classes")
            num_classes = 2 if len(probabilities) == 1 else len(probabilities)
        base = empty(num_classes)
        _check_label(label, num_classes)
        return msgspec.structs.replace(base, failed=1, labelled_failed=int(label is not None))

    if not probabilities:
        raise ValueError("a made prediction needs its output")
    output = [float(value) for value in probabilities]
    if not all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in output):
        raise ValueError("probabilities lie in [0, 1]")
    p = [1.0 - output[0], output[0]] if len(output) == 1 else output
    k = len(p)
    if num_classes is not None and num_classes != k:
        raise ValueError(f"{k} classes in the output, {num_classes} expected")
    _check_label(label, k)
    predicted = likely_class(output)  # the scalar rule (p >= 0.5) differs from argmax at a tie
    confidence = max(p)
    b = confidence_bin(confidence)

    counts = empty(k)  # fresh lists: setting their items here alters no other counts
    counts.predicted_class_counts[predicted] = 1
    counts.confidence_histogram[b] = 1
    if label is None:
        return msgspec.structs.replace(counts, predictions=1)
    hit = int(predicted == label)
    counts.confusion[label][predicted] = 1
    counts.bin_counts[b] = 1
    counts.bin_confidence_sums[b] = confidence
    counts.bin_correct[b] = hit
    brier = sum((p_k - (1.0 if i == label else 0.0)) ** 2 for i, p_k in enumerate(p))
    return msgspec.structs.replace(counts, predictions=1, labelled=1, correct=hit, brier_sum=brier)


def add(a: QualityCounts, b: QualityCounts) -> QualityCounts:
    """The counts of both spans (of one model: the class counts must agree)."""
    if a.num_classes != b.num_classes:
        raise ValueError(f"cannot add counts of {a.num_classes} and {b.num_classes} classes")
    return QualityCounts(
        num_classes=a.num_classes,
        predictions=a.predictions + b.predictions,
        failed=a.failed + b.failed,
        labelled=a.labelled + b.labelled,
        labelled_failed=a.labelled_failed + b.labelled_failed,
        correct=a.correct + b.correct,
        confusion=[_sum(row_a, row_b) for row_a, row_b in zip(a.confusion, b.confusion, strict=True)],
        bin_counts=_sum(a.bin_counts, b.bin_counts),
        bin_confidence_sums=_sum(a.bin_confidence_sums, b.bin_confidence_sums),
        bin_correct=_sum(a.bin_correct, b.bin_correct),
        brier_sum=a.brier_sum + b.brier_sum,
        predicted_class_counts=_sum(a.predicted_class_counts, b.predicted_class_counts),
        confidence_histogram=_sum(a.confidence_histogram, b.confidence_histogram),
    )


def merge(counts: Iterable[QualityCounts], num_classes: int | None = None) -> QualityCounts:
    """The sum of any number of counts; `num_classes` gives the answer when there are none."""
    total = empty(num_classes) if num_classes is not None else None
    for item in counts:
        total = item if total is None else add(total, item)
    if total is None:
        raise ValueError("merging no counts needs num_classes")
    return total


def quality_report(counts: QualityCounts) -> QualityReport:
    """The metrics, as defined in the module docstring."""
    c = counts.confusion
    k = counts.num_classes
    rows = [sum(c[t]) for t in range(k)]
    columns = [sum(c[t][j] for t in range(k)) for j in range(k)]
    precision = [_ratio(c[j][j], columns[j]) for j in range(k)]
    recall = [_ratio(c[j][j], rows[j]) for j in range(k)]
    f1 = [_ratio(2 * c[j][j], rows[j] + columns[j]) for j in range(k)]
    defined = [value for value in f1 if value is not None]
    n = counts.labelled
    # sum_b (n_b/N)|acc_b - conf_b| = (1/N) sum_b |correct_b - confidence_sum_b|: no per-bin division
    ece = (
        sum(abs(hits - conf) for hits, conf in zip(counts.bin_correct, counts.bin_confidence_sums, strict=True)) / n
        if n else None
    )
    return QualityReport(
        num_classes=k, predictions=counts.predictions, failed=counts.failed, labelled=n,
        labelled_failed=counts.labelled_failed, accuracy=_ratio(counts.correct, n), precision=precision,
        recall=recall, f1=f1, macro_f1=sum(defined) / len(defined) if defined else None, ece=ece,
        brier=counts.brier_sum / n if n else None, label_coverage=_ratio(n, counts.predictions),
    )


def psi(reference: Sequence[float], current: Sequence[float]) -> float | None:
    """Population stability index sum_i (a_i - e_i) ln(a_i / e_i) of the two count vectors' proportions
    (e: reference, a: current). An empty bin's proportion 0 is replaced by PSI_EPSILON (1e-4; the
    others are not renormalised), so it adds a large but finite term instead of infinity. None when
    either side is empty."""
    proportions = _proportions(reference, current)
    if proportions is None:
        return None
    e, a = ([x if x > 0 else PSI_EPSILON for x in side] for side in proportions)
    return sum((a_i - e_i) * math.log(a_i / e_i) for e_i, a_i in zip(e, a, strict=True))


def js_distance(reference: Sequence[float], current: Sequence[float]) -> float | None:
    """Jensen-Shannon distance sqrt(JSD) in base 2, in [0, 1] (0: same distribution, 1: disjoint);
    the reference is scipy.spatial.distance.jensenshannon(p, q, base=2). Counts are normalised
    first; None when either side is empty."""
    proportions = _proportions(reference, current)
    if proportions is None:
        return None
    p, q = proportions
    m = [(p_i + q_i) / 2 for p_i, q_i in zip(p, q, strict=True)]
    divergence = (_kl2(p, m) + _kl2(q, m)) / 2
    return math.sqrt(max(divergence, 0.0))  # rounding can leave -1e-17 where the answer is 0


def drift(reference: QualityCounts, current: QualityCounts) -> Drift:
    """Drift of the unlabelled signals (predicted classes, top-confidence histogram) between two spans."""
    if reference.num_classes != current.num_classes:
        raise ValueError("drift compares counts of one model")
    return Drift(
        predicted_class_psi=psi(reference.predicted_class_counts, current.predicted_class_counts),
        predicted_class_js=js_distance(reference.predicted_class_counts, current.predicted_class_counts),
        confidence_psi=psi(reference.confidence_histogram, current.confidence_histogram),
        confidence_js=js_distance(reference.confidence_histogram, current.confidence_histogram),
    )


def _check_label(label: int | None, num_classes: int) -> None:
    if label is not None and (type(label) is not int or not 0 <= label < num_classes):
        raise ValueError(f"a label is a class in [0, {num_classes}), not {label!r}")


def _sum(a: list, b: list) -> list:
    return [x + y for x, y in zip(a, b, strict=True)]


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _proportions(reference: Sequence[float], current: Sequence[float]) -> tuple[list[float], list[float]] | None:
    if len(reference) != len(current):
        raise ValueError("the two distributions need the same bins")
    if any(x < 0 or not math.isfinite(x) for x in (*reference, *current)):
        raise ValueError("counts are finite and not negative")
    e_total, a_total = sum(reference), sum(current)
    if e_total == 0 or a_total == 0:
        return None
    return [x / e_total for x in reference], [x / a_total for x in current]


def _kl2(p: list[float], m: list[float]) -> float:
    # 0 log 0 = 0; m_i > 0 wherever p_i > 0, since m is the mean of p and the other side
    return sum(p_i * math.log2(p_i / m_i) for p_i, m_i in zip(p, m, strict=True) if p_i > 0)
