"""Model-based quality: a fast linear classifier, "reference" text vs random web text.

The DCLM / FineWeb-Edu recipe in miniature: hashed word unigrams+bigrams (scikit-learn's
`HashingVectorizer`, so there is no vocabulary to store) and a logistic regression. Scoring
is a sparse dot product, thousands of documents per second on one core. fastText would be
the other choice; its wheel needs a compiler and its models are pickles of C++ state, while
this one saves as a plain ``.npz`` of weights (never a pickle) that `QualityScorer.load` reads.

What it trains on comes from the config (`quality_classifier.reference/negatives`); when the
user gives no reference set the stage "uses what it has": documents that passed every
heuristic filter against those the filters dropped (see stage.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmforge.runs import atomic_path


def _vectorizer(n_features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=n_features,
        ngram_range=(1, 2),
        alternate_sign=False,
        norm="l2",
        lowercase=True,
        token_pattern=r"(?u)\b\w\w+\b",
        dtype=np.float32,
    )


class QualityScorer:
    """P(reference | text) from a linear model over hashed n-grams."""

    def __init__(self, coef: np.ndarray, intercept: float, n_features: int, meta: dict | None = None):
        self.coef = coef.astype(np.float32)
        self.intercept = float(intercept)
        self.n_features = n_features
        self.meta = dict(meta or {})
        self._vec = _vectorizer(n_features)

    @classmethod
    def train(
        cls,
        positives: Sequence[str],
        negatives: Sequence[str],
        n_features: int = 2**18,
        seed: int = 0,
        max_chars: int = 20_000,
    ) -> QualityScorer:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        texts = [t[:max_chars] for t in positives] + [t[:max_chars] for t in negatives]
        y = np.array([1] * len(positives) + [0] * len(negatives))
        vec = _vectorizer(n_features)
        X = vec.transform(texts)
        meta: dict = {"n_positives": len(positives), "n_negatives": len(negatives)}
        model = LogisticRegression(C=4.0, solver="liblinear", class_weight="balanced", random_state=seed)
        if min(len(positives), len(negatives)) >= 10:  # fit on 80%, report accuracy on the other 20%
            Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
            model.fit(Xtr, ytr)
            meta["heldout_accuracy"] = round(float(model.score(Xte, yte)), 4)
            meta["trained_on"] = int(len(ytr))
        else:
            model.fit(X, y)
            meta["trained_on"] = int(len(y))
        return cls(model.coef_[0], model.intercept_[0], n_features, meta)

    def score(self, texts: Sequence[str], max_chars: int = 20_000) -> np.ndarray:
        if not len(texts):
            return np.zeros(0, dtype=np.float64)
        X = self._vec.transform([t[:max_chars] for t in texts])
        z = X @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    coef=self.coef,
                    intercept=np.float64(self.intercept),
                    n_features=np.int64(self.n_features),
                )

    @classmethod
    def load(cls, path: Path) -> QualityScorer:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["coef"], float(z["intercept"]), int(z["n_features"]))
