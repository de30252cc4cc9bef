"""Model quality from mergeable counts: hand-computed cases, a cross-check of summed per-prediction
counts against reference metrics computed from the raw predictions with numpy, merge laws, drift."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.quality import (
    QualityCounts,
    QualityReport,
    add,
    confidence_bin,
    drift,
    empty,
    from_prediction,
    js_distance,
    merge,
    psi,
    quality_report,
)

TOLERANCE = 1e-9
approx = lambda value: pytest.approx(value, abs=1e-12)  # noqa: E731

# (probabilities, label) of a 3-class model: the worked example below.
THREE_CLASS = [
    ([0.7, 0.2, 0.1], 0),  # predicted 0, right; Brier 0.09 + 0.04 + 0.01 = 0.14
    ([0.6, 0.3, 0.1], 1),  # predicted 0, wrong; 0.36 + 0.49 + 0.01 = 0.86
    ([0.1, 0.8, 0.1], 1),  # predicted 1, right; 0.01 + 0.04 + 0.01 = 0.06
    ([0.2, 0.2, 0.6], 2),  # predicted 2, right; 0.04 + 0.04 + 0.16 = 0.24
    ([0.1, 0.3, 0.6], 0),  # predicted 2, wrong; 0.81 + 0.09 + 0.36 = 1.26
    ([0.05, 0.9, 0.05], 1),  # predicted 1, right; 0.0025 + 0.01 + 0.0025 = 0.015
    ([0.3, 0.3, 0.4], None),  # predicted 2, not labelled
]


def three_class_counts() -> QualityCounts:
    rows = [from_prediction(p, label) for p, label in THREE_CLASS]
    return merge([*rows, from_prediction(None, 0, failed=True, num_classes=3)])


def test_a_three_class_example_computed_by_hand():
    counts = three_class_counts()
    assert counts.confusion == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]
    totals = (counts.predictions, counts.failed, counts.labelled, counts.labelled_failed, counts.correct)
    assert totals == (7, 1, 6, 1, 4)
    assert counts.predicted_class_counts == [2, 2, 3]
    assert counts.confidence_histogram == [0, 0, 0, 0, 1, 0, 3, 1, 1, 1]
    assert counts.bin_counts == [0, 0, 0, 0, 0, 0, 3, 1, 1, 1]
    assert counts.bin_correct == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]

    report = quality_report(counts)
    assert report.accuracy == approx(4 / 6)
    assert report.precision == [approx(1 / 2), approx(2 / 2), approx(1 / 2)]
    assert report.recall == [approx(1 / 2), approx(2 / 3), approx(1 / 1)]
    assert report.f1 == [approx(1 / 2), approx(4 / 5), approx(2 / 3)]
    assert report.macro_f1 == approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # bin 6: 3 predictions at 0.6, 1 right: |1/3 - 0.6|; bins 7, 8, 9: one right each at 0.7, 0.8, 0.9
    assert report.ece == approx(3 / 6 * (0.6 - 1 / 3) + 1 / 6 * 0.3 + 1 / 6 * 0.2 + 1 / 6 * 0.1)
    assert report.ece == approx(7 / 30)
    assert report.brier == approx((0.14 + 0.86 + 0.06 + 0.24 + 1.26 + 0.015) / 6)
    assert report.label_coverage == approx(6 / 7)
    assert (report.predictions, report.failed, report.labelled, report.labelled_failed) == (7, 1, 6, 1)


def test_a_scalar_model_is_a_two_class_one():
    counts = from_prediction([0.8], 1)
    assert counts.num_classes == 2 and counts.confusion == [[0, 0], [0, 1]]
    # [0.2, 0.8] against [0, 1]: 0.04 + 0.04, twice the binary (0.8 - 1)^2
    assert counts.brier_sum == approx(0.08)
    assert counts.bin_confidence_sums[8] == approx(0.8)
    # the scalar rule p >= 0.5 picks class 1 at a tie, where argmax would pick 0
    assert from_prediction([0.5], None).predicted_class_counts == [0, 1]
    assert from_prediction([0.5, 0.5], None).predicted_class_counts == [1, 0]
    assert from_prediction([0.2], 0).correct == 1


def test_nothing_labelled_leaves_the_labelled_metrics_undefined():
    report = quality_report(merge([from_prediction([0.9, 0.1], None), from_prediction([0.4, 0.6], None)]))
    assert report.accuracy is None and report.ece is None and report.brier is None and report.macro_f1 is None
    assert report.precision == [None, None] and report.recall == [None, None] and report.f1 == [None, None]
    assert report.label_coverage == 0.0
    nothing = quality_report(empty(3))
    assert nothing.label_coverage is None and nothing.accuracy is None


def test_a_class_never_predicted_has_no_precision_and_one_never_seen_has_no_f1():
    # 3 classes; class 1 occurs but is never predicted, class 2 neither occurs nor is predicted
    report = quality_report(merge([from_prediction([0.9, 0.05, 0.05], 0), from_prediction([0.6, 0.3, 0.1], 1)]))
    assert report.precision == [approx(1 / 2), None, None]
    assert report.recall == [approx(1.0), approx(0.0), None]
    # F1 = 2TP / (2TP + FP + FN): 0 for a class that occurs but is never found, None for class 2
    assert report.f1 == [approx(2 / 3), approx(0.0), None]
    assert report.macro_f1 == approx((2 / 3 + 0) / 2)


def test_top_confidence_bins():
    assert confidence_bin(1.0) == 9
    assert confidence_bin(0.1) == 1
    assert confidence_bin(math.nextafter(0.1, 0)) == 0
    # just below 0.9, where int(c * 10) would round up into bin 9
    assert confidence_bin(math.nextafter(0.9, 0)) == 8
    assert confidence_bin(0.0) == 0
    assert [confidence_bin(i / 10) for i in range(10)] == list(range(10))
    assert confidence_bin(0.95) == 9 and confidence_bin(0.3) == 3
    assert from_prediction([0.0, 1.0], 1).bin_counts[9] == 1
    assert from_prediction([1.0], None).confidence_histogram[9] == 1
    assert from_prediction([0.1] * 10, 3).bin_counts[1] == 1
    with pytest.raises(ValueError):
        confidence_bin(1.0000001)
    with pytest.raises(ValueError):
        confidence_bin(float("nan"))


def test_a_failed_prediction_counts_apart():
    counts = from_prediction(None, 2, failed=True, num_classes=4)
    assert (counts.predictions, counts.failed, counts.labelled, counts.labelled_failed) == (0, 1, 0, 1)
    assert counts.confusion == empty(4).confusion and counts.confidence_histogram == [0] * 10
    assert from_prediction([], None, failed=True, num_classes=4).labelled_failed == 0
    with pytest.raises(ValueError):
        from_prediction(None, None, failed=True)


@pytest.mark.parametrize(
    ("probabilities", "label", "num_classes"),
    [
        ([0.5, 0.5], 2, None),
        ([0.5, 0.5], -1, None),
        ([0.5, 0.5], True, None),
        ([0.5, 0.5], 1.0, None),
        ([1.5, -0.5], 0, None),
        ([float("nan"), 0.5], 0, None),
        ([0.5, 0.5], 0, 3),
        ([], 0, None),
        (None, None, None),
    ],
)
def test_what_is_not_a_prediction_is_refused(probabilities, label, num_classes):
    with pytest.raises(ValueError):
        from_prediction(probabilities, label, num_classes=num_classes)


def test_counts_of_different_models_do_not_add():
    with pytest.raises(ValueError):
        add(empty(2), empty(3))
    with pytest.raises(ValueError):
        merge([])
    assert merge([], num_classes=3) == empty(3)


def test_counts_and_report_are_json():
    counts = three_class_counts()
    assert msgspec.json.decode(msgspec.json.encode(counts), type=QualityCounts) == counts
    report = quality_report(empty(2))
    assert msgspec.json.decode(msgspec.json.encode(report), type=QualityReport) == report
    assert b'"accuracy":null' in msgspec.json.encode(report)


# --- drift --------------------------------------------------------------------------------------


def test_psi_of_known_distributions():
    assert psi([10, 20, 30], [1, 2, 3]) == 0.0
    # proportions [.5, .5] -> [.25, .75]: -.25 ln .5 + .25 ln 1.5 = .25 ln 3
    assert psi([50, 50], [25, 75]) == approx(0.25 * math.log(3))
    assert psi([25, 75], [50, 50]) == approx(0.25 * math.log(3))
    # an empty bin counts as a proportion of 1e-4
    assert psi([100, 0], [50, 50]) == approx((0.5 - 1) * math.log(0.5) + (0.5 - 1e-4) * math.log(0.5 / 1e-4))
    # only empty bins get the epsilon: a proportion of 5e-5 stays 5e-5
    expected = (0.5 - 5e-5) * math.log(0.5 / 5e-5) + (0.5 - 0.99995) * math.log(0.5 / 0.99995)
    assert psi([1, 19999], [1, 1]) == approx(expected)
    assert psi([0, 0], [1, 2]) is None and psi([1, 2], [0, 0]) is None


def test_js_distance_of_known_distributions():
    assert js_distance([1, 1, 2], [2, 2, 4]) == 0.0
    assert js_distance([1, 0], [0, 1]) == 1.0
    assert js_distance([3, 0, 0, 0], [0, 0, 5, 5]) == approx(1.0)
    # p = [.5, .5], q = [1, 0], m = [.75, .25]: JSD = 1.5 - .75 log2 3 bits (scipy: 0.5579...)
    assert js_distance([1, 1], [1, 0]) == approx(math.sqrt(1.5 - 0.75 * math.log2(3)))
    assert js_distance([1, 1], [1, 0]) == pytest.approx(0.557923, abs=1e-6)
    assert js_distance([], []) is None and js_distance([0, 0], [1, 0]) is None
    with pytest.raises(ValueError):
        js_distance([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        psi([1, -1], [1, 1])


def test_drift_compares_the_unlabelled_signals():
    reference = merge([from_prediction([0.9, 0.1], None), from_prediction([0.2, 0.8], 1)])
    current = merge([from_prediction([0.95, 0.05], None), from_prediction([0.6, 0.4], 0)])
    result = drift(reference, current)
    assert result.predicted_class_js == approx(js_distance([1, 1], [2, 0]))
    assert result.predicted_class_psi == approx(psi([1, 1], [2, 0]))
    # confidences 0.9, 0.8 -> 0.95, 0.6
    assert result.confidence_js == approx(js_distance([0] * 8 + [1, 1], [0] * 6 + [1, 0, 0, 1]))
    assert drift(empty(2), current).confidence_psi is None
    assert drift(current, current) == type(result)(
        predicted_class_psi=0.0, predicted_class_js=0.0, confidence_psi=0.0, confidence_js=0.0
    )


# --- the cross-check against references computed from the raw predictions ----------------------


def reference_psi(e_counts, a_counts):
    e = np.asarray(e_counts, float) / np.sum(e_counts)
    a = np.asarray(a_counts, float) / np.sum(a_counts)
    e, a = np.where(e == 0, 1e-4, e), np.where(a == 0, 1e-4, a)
    return float(np.sum((a - e) * np.log(a / e)))


def reference_js(p_counts, q_counts):
    """scipy.spatial.distance.jensenshannon(p, q, base=2), spelled out: rel_entr in nats, / ln 2."""
    p = np.asarray(p_counts, float) / np.sum(p_counts)
    q = np.asarray(q_counts, float) / np.sum(q_counts)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(p > 0, p * np.log(p / m), 0.0)
        right = np.where(q > 0, q * np.log(q / m), 0.0)
    return float(np.sqrt(max(np.sum(left + right) / np.log(2) / 2, 0.0)))


def reference_metrics(k, rows):
    """Every metric straight from the raw (output, label, failed) list, without the module."""
    made = [(out, label) for out, label, failed in rows if not failed]
    probs = np.array([[1 - out[0], out[0]] if len(out) == 1 else out for out, _ in made], float).reshape(-1, k)
    predicted = np.array([int(out[0] >= 0.5) if len(out) == 1 else int(np.argmax(out)) for out, _ in made], int)
    top = probs.max(axis=1) if len(made) else np.zeros(0)
    edges = np.arange(11) / 10
    bins = np.minimum(np.searchsorted(edges, top, side="right") - 1, 9)
    mask = np.array([label is not None for _, label in made], bool)
    y = np.array([label for _, label in made if label is not None], int)
    yhat, p, conf, b = predicted[mask], probs[mask], top[mask], bins[mask]
    n = len(y)
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (y, yhat), 1)
    precision, recall, f1 = [], [], []
    for c in range(k):
        tp = int(np.sum((y == c) & (yhat == c)))
        fp = int(np.sum((y != c) & (yhat == c)))
        fn = int(np.sum((y == c) & (yhat != c)))
        precision.append(tp / (tp + fp) if tp + fp else None)
        recall.append(tp / (tp + fn) if tp + fn else None)
        f1.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None)
        if precision[-1] is not None and recall[-1] is not None and precision[-1] + recall[-1] > 0:
            assert f1[-1] == pytest.approx(2 * precision[-1] * recall[-1] / (precision[-1] + recall[-1]))
    defined = [v for v in f1 if v is not None]
    ece = None
    if n:
        ece = 0.0
        for bin_ in range(10):
            inside = b == bin_
            if inside.any():
                ece += inside.sum() / n * abs(np.mean(yhat[inside] == y[inside]) - np.mean(conf[inside]))
    onehot = np.eye(k)[y] if n else np.zeros((0, k))
    return {
        "predictions": len(made),
        "failed": sum(1 for *_, failed in rows if failed),
        "labelled": n,
        "labelled_failed": sum(1 for _, label, failed in rows if failed and label is not None),
        "confusion": confusion.tolist(),
        "accuracy": float(np.mean(yhat == y)) if n else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_f1": float(np.mean(defined)) if defined else None,
        "ece": ece,
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))) if n else None,
        "label_coverage": n / len(made) if made else None,
        "predicted_class_counts": np.bincount(predicted, minlength=k).tolist(),
        "confidence_histogram": np.bincount(bins, minlength=10).tolist(),
    }


def close(actual, expected) -> bool:
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(close(a, e) for a, e in zip(actual, expected, strict=True))
    if expected is None or actual is None:
        return actual is expected
    return abs(actual - expected) <= TOLERANCE


# weights from integers give exact bin edges (3/10, 1/2, 1.0) often; floats give the rest
weight = st.integers(0, 10).map(float) | st.floats(0, 1)


@st.composite
def prediction_sets(draw):
    k = draw(st.integers(2, 5))
    scalar = k == 2 and draw(st.booleans())
    rows = []
    for _ in range(draw(st.integers(0, 40))):
        failed = draw(st.integers(0, 6)) == 0
        label = draw(st.none() | st.integers(0, k - 1))
        if scalar:
            output = [draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0, 1))]
        else:
            weights = draw(st.lists(weight, min_size=k, max_size=k))
            total = sum(weights)
            output = [w / total for w in weights] if total > 0 else [1.0] + [0.0] * (k - 1)
        rows.append((output, label, failed))
    return k, rows


def counts_of(k, rows):
    return [from_prediction(None if failed else out, label, failed, num_classes=k) for out, label, failed in rows]


def same_counts(a: QualityCounts, b: QualityCounts) -> bool:
    """Integers exactly; the two float sums up to rounding (addition of floats is not associative)."""
    floats = {"bin_confidence_sums", "brier_sum"}
    ints_a = {f: getattr(a, f) for f in a.__struct_fields__ if f not in floats}
    ints_b = {f: getattr(b, f) for f in b.__struct_fields__ if f not in floats}
    return ints_a == ints_b and close(a.bin_confidence_sums, b.bin_confidence_sums) and close(a.brier_sum, b.brier_sum)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), case=prediction_sets())
def test_summed_counts_give_the_reference_metrics(data, case):
    k, rows = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rows)), max_size=5)))
    buckets = [rows[start:end] for start, end in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
    order = data.draw(st.permutations(range(len(buckets))))
    bucket_counts = [merge(counts_of(k, buckets[i]), num_classes=k) for i in order]
    report = quality_report(merge(bucket_counts, num_classes=k))
    counts = merge(bucket_counts, num_classes=k)

    expected = reference_metrics(k, rows)
    assert counts.confusion == expected["confusion"]
    assert counts.predicted_class_counts == expected["predicted_class_counts"]
    assert counts.confidence_histogram == expected["confidence_histogram"]
    for name in ("predictions", "failed", "labelled", "labelled_failed"):
        assert getattr(report, name) == expected[name], name
    for name in ("accuracy", "precision", "recall", "f1", "macro_f1", "ece", "brier", "label_coverage"):
        assert close(getattr(report, name), expected[name]), (name, getattr(report, name), expected[name])


@settings(max_examples=200, deadline=None)
@given(data=st.data(), case=prediction_sets())
def test_merge_is_associative_order_independent_with_an_identity(data, case):
    k, rows = case
    singles = counts_of(k, rows)
    shuffled = data.draw(st.permutations(singles))
    assert same_counts(merge(shuffled, num_classes=k), merge(singles, num_classes=k))
    a, b, c = (merge(singles[i::3], num_classes=k) for i in range(3))
    assert same_counts(add(add(a, b), c), add(a, add(b, c)))
    assert same_counts(add(a, b), add(b, a))
    assert add(empty(k), a) == a and add(a, empty(k)) == a


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda n: st.tuples(*[st.lists(st.integers(0, 50), min_size=n, max_size=n)] * 2)
    )
)
def test_drift_matches_the_references(pair):
    reference, current = pair
    if sum(reference) == 0 or sum(current) == 0:
        assert psi(reference, current) is None and js_distance(reference, current) is None
        return
    assert abs(psi(reference, current) - reference_psi(reference, current)) <= TOLERANCE
    distance = js_distance(reference, current)
    assert abs(distance - reference_js(reference, current)) <= TOLERANCE
    assert 0.0 <= distance <= 1.0 and abs(distance - js_distance(current, reference)) <= TOLERANCE
    assert psi(reference, current) >= -TOLERANCE
