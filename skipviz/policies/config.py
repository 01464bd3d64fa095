"""Policies back from their recorded configuration (:meth:`Policy.config`), keyed by name."""
from __future__ import annotations

from typing import Mapping

from .base import Policy
from .kl import KLRedundancyPolicy
from .simple import EarlyExitPolicy, FullPolicy, StaticMaskPolicy
from .threshold import GatePolicy, PlanPolicy

__all__ = ["POLICY_TYPES", "policy_from_config"]

#: Every policy :func:`policy_from_config` rebuilds, by its ``name``.
POLICY_TYPES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    FullPolicy, StaticMaskPolicy, GatePolicy, PlanPolicy, EarlyExitPolicy, KLRedundancyPolicy)}


def policy_from_config(config: Mapping) -> Policy:
    """Rebuild a policy from :meth:`Policy.config` output (used to reproduce audited runs)."""
    name = config.get("name")
    cls = POLICY_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown policy {name!r}")
    return cls.from_config(config)
