"""Load-balancing policies: which attention node gets the next request (one file per policy)."""

from router.policies.base import LoadBalancingPolicy
from router.policies.least_pressure import LeastPressurePolicy

__all__ = ["LeastPressurePolicy", "LoadBalancingPolicy"]
