"""The one-step transitions ``method.tree.transition`` can name (docs/method.md §3).

Both share one signature, ``(x, velocity, sigma, sigma_next, eta, sde) -> (mean, std, x̂0)``, so the
rollout and the update pick one by name and never branch on it.
"""

from __future__ import annotations

from typing import Callable

from branchgrpo.sde import transition_mean
from branchgrpo.sde_flowgrpo import transition_mean_flowgrpo

Transition = Callable[..., tuple]

TRANSITIONS: dict[str, Transition] = {
    "flowsde": transition_mean,  # DanceGRPO / BranchGRPO: std = η·√Δ
    "flowgrpo": transition_mean_flowgrpo,  # Flow-GRPO: std = a·sqrt(σ/(1−σ))·√Δ
}


def get_transition(name: str) -> Transition:
    """The transition function for ``method.tree.transition`` (``flowsde`` | ``flowgrpo``)."""
    try:
        return TRANSITIONS[name]
    except KeyError:
        raise ValueError(f"unknown transition {name!r}; allowed values: {', '.join(TRANSITIONS)}") from None


__all__ = ["TRANSITIONS", "Transition", "get_transition"]
