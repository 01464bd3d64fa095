"""Policies in words, for people: ``"gates, threshold 0.30, 2 overrides"`` instead of a configuration dict.

:func:`describe_policy` reads a policy or its :meth:`~skipviz.policies.base.Policy.config` (as audits store it),
so a page, a report or a log says the same words for the same policy.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["describe_policy", "exit_blocks_words", "plural"]


def plural(n: int, word: str) -> str:
    """``"1 override"``, ``"2 overrides"``, ``"0 overrides"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def exit_blocks_words(options: Mapping) -> str:
    """Where an early-exit policy (its config, or a card's operating point) checks its exits, as a clause:
    ``", exits after blocks 6, 8, 11"``, ``", from block 6"`` (``min_block`` only), ``""`` (after every block)."""
    blocks = options.get("blocks")
    if blocks is not None:
        listed = ", ".join(str(int(b)) for b in sorted(blocks))
        return f", exits after block{'' if len(blocks) == 1 else 's'} {listed}" if blocks else ", no exit checked"
    return f", from block {options['min_block']}" if options.get("min_block") else ""


def _threshold(v: Any) -> str:
    try:
        return f"{float(v):.2f}"
    except (TypeError, ValueError):
        return str(v)


def describe_policy(policy: Any) -> str:
    """A policy (or its ``config()`` dict) in a few words.

    ``{"name": "gates", "threshold": 0.3, "overrides": {"2": "skip", "5": "run"}}`` ->
    ``"gates, threshold 0.30, 2 overrides"``; the full network -> ``"full network (every block runs)"``; the
    KL policy -> ``"KL redundancy, q 0.30, 3 blocks skipped"``; a policy this module does not know -> its name.
    """
    config: Mapping = policy if isinstance(policy, Mapping) else policy.config()
    name = str(config.get("name", "policy"))
    if name in ("gates", "plan"):
        words = [name, f"threshold {_threshold(config.get('threshold', 0.5))}"]
        n = len(config.get("overrides") or {})
        if n:
            words.append(plural(n, "override"))
        return ", ".join(words)
    if name == "full":
        return "full network (every block runs)"
    if name == "static":
        return f"static mask, {plural(len(config.get('skip') or []), 'block')} skipped"
    if name == "kl_redundancy":
        return (f"KL redundancy, q {_threshold(config.get('q', 0.3))}, "
                f"{plural(len(config.get('skip') or []), 'block')} skipped")
    if name == "early_exit":
        n = len(config.get("overrides") or {})
        return (f"early exit, threshold {_threshold(config.get('threshold', 0.9))}"
                + exit_blocks_words(config)
                + (f", {plural(n, 'override')}" if n else ""))
    if name == "frozen":
        executed = config.get("executed") or []
        return f"frozen decisions, {sum(bool(e) for e in executed)}/{len(executed)} blocks run"
    return name
