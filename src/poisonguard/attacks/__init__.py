"""Red-team attack generators with ground truth: BadNets, blended, label flip."""

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

__all__ = ["ATTACKS", "BadNetsTrigger", "BlendTrigger", "PoisonedData", "Trigger", "badnets",
           "blended", "label_flip", "make_attack", "poison_dataset"]
