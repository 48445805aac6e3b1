"""The math of groupwise: pure tensor functions in registries, selected by name from the config.

Add your own part with a decorator, e.g.::

    from groupwise.algorithms import register_advantage

    @register_advantage("my_estimator")
    def my_estimator(rewards, group_id, **options):
        ...
"""
from groupwise.algorithms.advantages import ADVANTAGES, GROUP_ESTIMATORS, compute_advantages, register_advantage
from groupwise.algorithms.losses import AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS, StepCounts, SurrogateOutput
from groupwise.algorithms.objective import ObjectiveOutput, ObjectiveParts, policy_objective
from groupwise.algorithms.regularizers import KL_ESTIMATORS, entropy_from_logits

register_policy_loss = POLICY_LOSSES.register
register_ratio_level = RATIO_LEVELS.register
register_aggregation = AGGREGATIONS.register


def needs_groups(advantage: str) -> bool:
    """Whether an estimator compares completions within a group (then G ≥ 2 is required)."""
    return advantage in GROUP_ESTIMATORS


__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "RATIO_LEVELS", "GROUP_ESTIMATORS",
    "ObjectiveOutput", "ObjectiveParts", "StepCounts", "SurrogateOutput",
    "compute_advantages", "entropy_from_logits", "needs_groups", "policy_objective",
    "register_advantage", "register_aggregation", "register_policy_loss", "register_ratio_level",
]
