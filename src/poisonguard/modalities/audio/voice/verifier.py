"""A simple speaker verifier to measure the enrolment-poisoning attack: clip embeddings
(speaker features, standardised, optionally projected by an LDA trained on background
speakers), an account's enrolment embeddings, cosine scores against their mean (``mode``
"mean", one template) or the best-matching enrolment clip ("max", which one planted clip
already opens), and one threshold calibrated on genuine trials at a target false-reject rate."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from poisonguard.errors import ConfigError


@dataclass
class CosineVerifier:
    frr: float = 0.05
    mode: str = "mean"
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))
    projection: np.ndarray | None = None
    threshold: float = 1.0

    def fit(self, features: np.ndarray, speakers: np.ndarray | None = None) -> CosineVerifier:
        """Standardise on ``features`` (background clips); with ``speakers``, also learn an LDA
        projection that separates them (the embedding a trained speaker encoder would give)."""
        self.mean = features.mean(axis=0)
        sd = features.std(axis=0)
        self.scale = np.where(sd > 1e-9, sd, 1.0)
        if speakers is not None:
            from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

            lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto")
            lda.fit((features - self.mean) / self.scale, speakers)
            self.projection = lda.scalings_[:, :len(np.unique(speakers)) - 1]
        return self

    def embed(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.mean) / self.scale
        if self.projection is not None:
            z = z @ self.projection
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def template(self, enrolment: np.ndarray) -> np.ndarray:
        """(1, d) normalised mean embedding ("mean") or (n, d) clip embeddings ("max")."""
        e = self.embed(enrolment)
        if self.mode == "max":
            return e
        if self.mode != "mean":
            raise ConfigError(f"verifier mode {self.mode!r}: expected 'mean' or 'max'")
        t = e.mean(axis=0, keepdims=True)
        return t / max(float(np.linalg.norm(t)), 1e-12)

    def scores(self, template: np.ndarray, features: np.ndarray) -> np.ndarray:
        return (self.embed(features) @ template.T).max(axis=1)

    def calibrate(self, genuine_scores: np.ndarray) -> float:
        """The threshold that rejects ``frr`` of the genuine trials."""
        if len(genuine_scores) == 0:
            raise ConfigError("no genuine trials to calibrate the verifier on")
        self.threshold = float(np.quantile(genuine_scores, self.frr))
        return self.threshold

    def accept(self, template: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.scores(template, features) >= self.threshold
