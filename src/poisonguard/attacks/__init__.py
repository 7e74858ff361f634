"""Red-team attack generators with ground truth: BadNets, blended, label flip, WaNet, SIG,
Adaptive-Blend/-Patch, Trojan watermark, low-frequency, BadNets with a random patch,
label-consistent."""

from poisonguard.attacks.adaptive import (
    AdaptiveBlendTrigger,
    AdaptivePatchTrigger,
    adaptive_blend,
    adaptive_patch,
)
from poisonguard.attacks.advanced import (
    LowFrequencyTrigger,
    RandomPatchTrigger,
    SigTrigger,
    WarpTrigger,
    WatermarkTrigger,
    badnets_random,
    low_frequency,
    sig,
    trojan,
    wanet,
)
from poisonguard.attacks.base import PoisonedData, Trigger, poison_dataset
from poisonguard.attacks.generators import (
    ATTACKS,
    BadNetsTrigger,
    BlendTrigger,
    badnets,
    blended,
    label_flip,
    make_attack,
)
from poisonguard.attacks.label_consistent import FourCornerTrigger, label_consistent

ATTACKS.update({"wanet": wanet, "sig": sig, "adaptive-blend": adaptive_blend,
                "adaptive-patch": adaptive_patch, "trojan": trojan,
                "low-frequency": low_frequency, "badnets-random": badnets_random,
                "label-consistent": label_consistent})

__all__ = ["ATTACKS", "AdaptiveBlendTrigger", "AdaptivePatchTrigger", "BadNetsTrigger",
           "BlendTrigger", "FourCornerTrigger", "LowFrequencyTrigger", "PoisonedData",
           "RandomPatchTrigger", "SigTrigger", "Trigger", "WarpTrigger", "WatermarkTrigger",
           "adaptive_blend", "adaptive_patch", "badnets", "badnets_random", "blended",
           "label_consistent", "label_flip", "low_frequency", "make_attack", "poison_dataset",
           "sig", "trojan", "wanet"]
