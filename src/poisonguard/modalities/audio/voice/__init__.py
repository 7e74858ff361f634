"""Voice authentication: audit enrolment sets for a second voice (an attacker's clips enrolled
under a victim's account), the red-team generator of that attack, and a cosine verifier to
measure it."""

from poisonguard.modalities.audio.voice.accounts import (
    AccountAudit,
    audit_accounts,
    load_accounts,
)
from poisonguard.modalities.audio.voice.features import speaker_features
from poisonguard.modalities.audio.voice.redteam import poison_enrolment
from poisonguard.modalities.audio.voice.verifier import CosineVerifier

__all__ = ["AccountAudit", "CosineVerifier", "audit_accounts", "load_accounts",
           "poison_enrolment", "speaker_features"]
