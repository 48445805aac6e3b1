"""Which parts do not compose, and why: checked when the config is validated.

Everything not listed here composes: any estimator × any ratio level × any surrogate × any
aggregation (a parametrized test runs a training step for each combination).
"""
from __future__ import annotations

# (loss, reason) — surrogates that read the token-level log-ratio themselves or use none.
_TOKEN_RATIO_ONLY = {
    "gmpo": "it clips each token's log-ratio by the sign of the advantage and takes the geometric mean itself",
    "reinforce": "it uses no importance ratio (−A·log π)",
    "gpg": "it uses no importance ratio (−A·log π)",
}


def incompatibility(*, advantage: str, ratio_level: str, loss: str, aggregation: str) -> str | None:
    """A one-sentence reason the combination is refused, or None when it composes."""
    if loss in _TOKEN_RATIO_ONLY and ratio_level != "token":
        return (f"algorithm.loss '{loss}' needs algorithm.ratio_level 'token', got '{ratio_level}': "
                f"{_TOKEN_RATIO_ONLY[loss]}")
    return None
