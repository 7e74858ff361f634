"""The runtime layer: STRIP screening of inputs at inference time (offline and as a service)."""

from poisonguard.runtime.strip import (
    StripConfig,
    StripFilter,
    StripResult,
    evaluate,
    validate_inputs,
)

__all__ = ["StripConfig", "StripFilter", "StripResult", "evaluate", "validate_inputs"]
