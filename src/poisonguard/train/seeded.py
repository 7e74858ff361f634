"""Seeded expansion: grow ABL's small, pure isolated set to the whole poison population.

ABL's lowest-loss 1% is nearly all poison, but a fixed 1% is only a tenth of the poisons at a 10%
rate, and the poisons left in training keep the backdoor alive. The seed says *which* classes are
claimed by a shortcut; inside each claimed class the quarantine's detectors then find the rest:

* activation clustering on the class's representations at the isolation epoch, with its own
  guards (silhouette, centroid separation, cluster size), so a clean class, whose split is not
  separated, adds nothing; the cluster is accepted only when it holds most of the seed;
* the trigger template formed from the seed and the accepted cluster (a stamped patch leaves pixel
  values they share and the rest of the class lacks), which also finds poisons the network has not
  yet learned; used only in a class the clustering confirmed;
* the blend template of the same set (a blended pattern leaves a shared high-frequency additive
  component), which finds the blended poisons the clustering left with the clean samples; also
  only in a confirmed class.

Nothing here uses the poison rate or the target class: both come out of the seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from poisonguard.detect.activation_clustering import ActivationClustering
from poisonguard.detect.blend_template import BlendTemplate
from poisonguard.detect.trigger_template import TriggerTemplate


def expand_from_seed(x: np.ndarray, labels: np.ndarray, reps: np.ndarray, losses: np.ndarray,
                     seed: np.ndarray, min_claim: float = 0.1,
                     min_seed_share: float = 0.5) -> tuple[np.ndarray, dict[str, Any]]:
    """Samples to isolate in addition to ``seed`` (a boolean mask), with per-class evidence.

    A class is claimed when it holds at least ``min_claim`` of the seed; its poison cluster is
    accepted when activation clustering calls the class poisoned and the cluster holds at least
    ``min_seed_share`` of the class's seed samples."""
    added = np.zeros(len(labels), dtype=bool)
    classes, counts = np.unique(labels[seed], return_counts=True)
    claimed = [int(c) for c, n in zip(classes, counts) if n >= min_claim * seed.sum()]
    evidence: dict[str, Any] = {"claimed_classes": claimed, "classes": {}}
    for c in claimed:
        idx = np.flatnonzero(labels == c)
        if len(idx) < 10:
            evidence["classes"][str(c)] = {"accepted": False, "reason": "class too small"}
            continue
        ac = ActivationClustering().detect(reps[idx], labels[idx], losses=losses[idx])
        finding = ac.findings[0]
        group = ac.flags
        in_seed = seed[idx]
        share = float(group[in_seed].mean()) if in_seed.any() else 0.0
        accepted = bool(finding.suspicious and share >= min_seed_share)
        entry: dict[str, Any] = {"accepted": accepted, "seed_share_in_cluster": round(share, 4),
                                 "cluster": {k: v for k, v in finding.evidence.items()
                                             if k in ("poison_cluster_size", "silhouette",
                                                      "separation")},
                                 "suspicious": bool(finding.suspicious)}
        if accepted:
            cls = np.zeros(len(labels), dtype=bool)
            cls[idx[group]] = True
            template = TriggerTemplate().detect(x, labels, seed | cls, [c])
            blend = BlendTemplate().detect(x, labels, seed | cls, [c])
            entry["n_cluster"] = int(group.sum())
            entry["n_template"] = int((template.flags & (labels == c)).sum())
            entry["n_blend_template"] = int((blend.flags & (labels == c)).sum())
            entry["blend_template"] = blend.findings[0].evidence
            cls |= (template.flags | blend.flags) & (labels == c)
            added |= cls & ~seed
        entry["n_added"] = int((added[idx]).sum())
        evidence["classes"][str(c)] = entry
    evidence["n_added"] = int(added.sum())
    return added, evidence


def loss_floor_epochs(epochs: int) -> int:
    """How many of a schedule's epochs run under the loss floor by default: a quarter, at least
    one (the isolation point of ABL and of the quarantine's loss seed)."""
    return max(1, math.ceil(epochs / 4))


def loss_floor_ascent(per_sample: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's local gradient ascent: descend on samples above the loss floor ``gamma`` and ascend
    on those below, so no sample is fitted past the floor; a shortcut (a trigger) reaches the
    floor first, which is what makes the lowest losses after these epochs mostly poison."""
    return (torch.sign(per_sample.detach() - gamma) * per_sample).mean()
