"""Decision sources: which blocks run for which input, and why.

* :mod:`~skipviz.policies.base` - the interface (:class:`Policy`, :class:`Decision`, :class:`Plan`).
* :mod:`~skipviz.policies.simple` - :class:`FullPolicy`, :class:`StaticMaskPolicy`, :class:`EarlyExitPolicy`,
  :class:`FrozenPolicy`.
* :mod:`~skipviz.policies.threshold` - :class:`GatePolicy`, :class:`PlanPolicy`, the table of decision sources
  and :func:`policy_for`.
* :mod:`~skipviz.policies.kl` - :class:`KLRedundancyPolicy`.
* :mod:`~skipviz.policies.config` - :func:`policy_from_config`.
* :mod:`~skipviz.policies.words` - :func:`describe_policy` (a policy in words).
"""
from .base import Decision, Override, Plan, Policy, normalise_overrides
from .config import POLICY_TYPES, policy_from_config
from .kl import KLRedundancyPolicy
from .simple import EarlyExitPolicy, FrozenPolicy, FullPolicy, StaticMaskPolicy
from .threshold import (DECISION_SOURCES, THRESHOLD_POLICIES, DecisionSource, GatePolicy, PlanPolicy, make_policy,
                        offered_sources, policy_for, score_label)
from .words import describe_policy

__all__ = ["DECISION_SOURCES", "Decision", "DecisionSource", "EarlyExitPolicy", "FrozenPolicy", "FullPolicy",
           "GatePolicy", "KLRedundancyPolicy", "Override", "POLICY_TYPES", "Plan", "PlanPolicy", "Policy",
           "StaticMaskPolicy", "THRESHOLD_POLICIES", "describe_policy", "make_policy", "normalise_overrides", "offered_sources",
           "policy_for", "policy_from_config", "score_label"]
