"""Pixel metrics from confusion counts and probability histograms (shared by train and evaluate).

Probabilities are quantised as in the probability rasters (0..250 for 0..1), so that a threshold sweep over
any number of pixels needs only two 251-bin histograms.
"""

from __future__ import annotations

import numpy as np

from minemap.formats.rasters import LEVELS


def binary_metrics(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Precision, recall, F1, IoU and accuracy; 0 where undefined (no positives predicted or present)."""
    def div(a: float, b: float) -> float:
        return float(a / b) if b > 0 else 0.0

    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": div(2 * precision * recall, precision + recall),
        "iou": div(tp, tp + fp + fn),
        "accuracy": div(tp + tn, tp + fp + fn + tn),
        "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
    }


def histograms(levels: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histograms (251 bins) of quantised probabilities over positive and negative truth pixels."""
    levels = levels.ravel().astype(np.int64)
    truth = truth.ravel().astype(bool)
    return (np.bincount(levels[truth], minlength=LEVELS + 1)[: LEVELS + 1],
            np.bincount(levels[~truth], minlength=LEVELS + 1)[: LEVELS + 1])


def metrics_at(hist_pos: np.ndarray, hist_neg: np.ndarray, threshold: float) -> dict[str, float]:
    """Metrics of the rule ``probability >= threshold`` from the two histograms."""
    cut = int(np.ceil(threshold * LEVELS - 1e-9))
    tp, fn = hist_pos[cut:].sum(), hist_pos[:cut].sum()
    fp, tn = hist_neg[cut:].sum(), hist_neg[:cut].sum()
    return binary_metrics(tp, fp, fn, tn)


def sweep(hist_pos: np.ndarray, hist_neg: np.ndarray, thresholds: np.ndarray | None = None) -> list[dict]:
    """Metrics at each threshold (default 0.05, 0.10, ..., 0.95)."""
    thresholds = np.round(np.arange(0.05, 0.951, 0.05), 2) if thresholds is None else thresholds
    return [{"threshold": float(t), **metrics_at(hist_pos, hist_neg, float(t))} for t in thresholds]


def best_threshold(hist_pos: np.ndarray, hist_neg: np.ndarray) -> tuple[float, dict]:
    """The threshold of the sweep with the highest F1 (the middle one among ties)."""
    rows = sweep(hist_pos, hist_neg)
    f1 = np.array([r["f1"] for r in rows])
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    row = rows[int(best[len(best) // 2])]
    return row["threshold"], row


def operating_threshold(hist_pos: np.ndarray, hist_neg: np.ndarray) -> tuple[float, dict]:
    """The threshold a run maps with, from calibrated validation probabilities: half the best F1 of the sweep
    (on its 0.05 grid), with the metrics there.

    For calibrated probabilities the F1-optimal threshold is half the optimal F1 (Lipton, Elkan & Naryanaswamy
    2014). The sweep's own argmax is not used: validation labels miss mines and are drawn metres off, and a
    detection of a mine nobody drew counts as a false alarm there, so the argmax climbs towards the top of the
    probability range, where a small shift of the probabilities in another block or year empties the map
    (a fresh draw of bench_accuracy scenes: 0.85 chosen, test-block F1 0.03 at it, 0.57 at half the best F1)."""
    rows = sweep(hist_pos, hist_neg)
    best = max(r["f1"] for r in rows)
    if best <= 0:  # nothing to go by (no mine pixel, or none found): the calibrated even odds
        return best_threshold(hist_pos, hist_neg)
    row = min(rows, key=lambda r: (abs(r["threshold"] - best / 2), r["threshold"]))
    return row["threshold"], row


MCE_MIN_SHARE = 0.01  # the maximum calibration error looks at bins holding at least this share of mine pixels


def reliability(hist_pos: np.ndarray, hist_neg: np.ndarray, bins: int = 10) -> dict:
    """Calibration errors and a reliability table from the two histograms of quantised probabilities.

    Each of ``bins`` equal-width probability bins holds its pixels, their mean predicted probability and the
    observed share of mining pixels; ECE is the pixel-weighted mean gap between the two. Most pixels of a scene
    are sure background in the lowest bin, so ECE stays small however wrong the bins that hold the mines are:
    MCE, the largest gap over the bins holding at least :data:`MCE_MIN_SHARE` of the mine pixels, says how far
    a probability the mines get can be trusted.
    """
    levels = np.arange(LEVELS + 1) / LEVELS
    which = np.minimum((levels * bins).astype(int), bins - 1)
    n = hist_pos + hist_neg
    count = np.bincount(which, weights=n, minlength=bins)
    pos = np.bincount(which, weights=hist_pos, minlength=bins)
    pred = np.bincount(which, weights=n * levels, minlength=bins)
    total = count.sum()
    table, ece, mce = [], 0.0, 0.0
    mines = pos.sum()
    for b in range(bins):
        if count[b] == 0:
            continue
        mean_p, observed = pred[b] / count[b], pos[b] / count[b]
        ece += count[b] / total * abs(mean_p - observed)
        if mines and pos[b] >= MCE_MIN_SHARE * mines:
            mce = max(mce, abs(mean_p - observed))
        table.append({"bin": [b / bins, (b + 1) / bins], "pixels": int(count[b]), "mine_pixels": int(pos[b]),
                      "mean_probability": round(float(mean_p), 4), "observed": round(float(observed), 4)})
    return {"ece": float(ece), "mce": float(mce), "mce_min_share": MCE_MIN_SHARE, "table": table}


def fit_platt(logits: np.ndarray, truth: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """Scale and bias so that sigmoid(scale x logit + bias) is calibrated on (logits, truth): Newton steps on
    the mean log-loss, which is convex in the two parameters. Returns (1, 0) where a class is missing."""
    z = np.clip(np.asarray(logits, np.float64).ravel(), -30, 30)
    t = np.asarray(truth, np.float64).ravel()
    if len(z) == 0 or t.min() == t.max():
        return 1.0, 0.0
    def loss(a: float, b: float) -> float:
        u = a * z + b
        return float(np.mean(np.logaddexp(0, u) - t * u))

    a, b = 1.0, 0.0
    cur = loss(a, b)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(a * z + b)))
        r, w = p - t, np.maximum(p * (1 - p), 1e-12)
        g = np.array([(r * z).mean(), r.mean()])
        h = np.array([[(w * z * z).mean(), (w * z).mean()], [(w * z).mean(), w.mean()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        for _ in range(30):  # halve the step until the loss goes down (separable data would run away)
            na, nb = a - step[0], b - step[1]
            new = loss(na, nb)
            if new <= cur:
                break
            step = step / 2
        else:
            break
        a, b, done = na, nb, cur - new < 1e-10
        cur = new
        if done:
            break
    return float(np.clip(a, 1e-3, 1e3)), float(b)


def block_bootstrap(parts: np.ndarray, statistic, n: int = 1000, seed: int = 0, level: float = 0.95
                    ) -> dict[str, list[float]]:
    """Percentile intervals (``level``) of ``statistic`` by the bootstrap over spatial blocks: ``parts`` holds one
    row of additive counts per block (pixels, or objects, of one block are not independent; blocks nearly are);
    each of ``n`` resamples draws as many blocks with replacement and sums their rows. ``statistic`` maps summed
    rows (n, m) to named arrays (n,). Fewer than two blocks: no interval (empty)."""
    parts = np.asarray(parts, dtype=float)
    k = len(parts)
    if k < 2:
        return {}
    rng = np.random.default_rng(seed)
    step = max(1, 4_000_000 // k)  # resamples at a time: the draws per block of a batch stay a few MB
    sums = np.concatenate([rng.multinomial(k, np.full(k, 1.0 / k), size=min(step, n - i)) @ parts
                           for i in range(0, n, step)])
    cut = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    return {name: [float(v) for v in np.percentile(vals, cut)] for name, vals in statistic(sums).items()}


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)


def pixel_statistics(tot: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and IoU of summed confusion counts (columns tp, fp, fn, tn), as in
    :func:`binary_metrics`, over many rows at once."""
    tp, fp, fn = tot[:, 0], tot[:, 1], tot[:, 2]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "iou": _ratio(tp, tp + fp + fn)}


def object_statistics(tot: np.ndarray) -> dict[str, np.ndarray]:
    """Object precision and recall of summed counts (columns predicted, predicted that meet a reference,
    reference, reference met by a prediction)."""
    return {"precision": _ratio(tot[:, 1], tot[:, 0]), "recall": _ratio(tot[:, 3], tot[:, 2])}
