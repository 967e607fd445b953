"""The training data order and the random streams of an iteration: what makes a run reproducible
and a resumed or re-sharded run draw exactly the same numbers."""

from __future__ import annotations

from enum import IntEnum

import torch


class PromptSampler:
    """Deterministic epochs over the training prompts: each epoch is a seeded permutation."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts = list(prompts)
        self.seed = seed
        self.position = 0  # prompts handed out so far (the data position a resume restores)

    def next(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.prompts))
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(self.prompts[int(order[index])])
            self.position += 1
        return out


class RandomStream(IntEnum):
    """What an iteration's random numbers are for; each purpose has its own stream."""

    ROLLOUT = 0  # root and split noise of each prompt's tree
    SELECTION = 1  # random edge subsets (timestep_fraction) of each prompt's tree
    UPDATE = 2  # micro-batch order of each process's update


def iteration_generator(
    seed: int, iteration: int, stream: int, index: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """Independent, reproducible random stream per (seed, iteration, :class:`RandomStream`, prompt
    group or rank).

    All randomness of an iteration comes from these, so a resumed run and a run on any number
    of processes draw exactly the same noise for the same prompt.
    """
    key = (((seed * 1_000_003 + iteration) * 16 + int(stream)) * 1_000_033 + index) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(key)
