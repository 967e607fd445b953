"""A tree too large to hold is refused when the config is built, before anything allocates."""

import pytest

from branchgrpo.config import ConfigError
from branchgrpo.tree.presets import method_config
from branchgrpo.tree.spec import MAX_LEAVES_PER_PROMPT


def test_huge_split_plan_is_one_config_error():
    with pytest.raises(ConfigError, match=r"tree.split_plan: gives 1,000,000,000,000,000 leaves"):
        method_config("branchgrpo", ["tree.split_plan={0: 100000, 1: 100000, 2: 100000}"])


def test_limit_counts_roots_times_branching():
    k = 4
    roots = MAX_LEAVES_PER_PROMPT // k**4
    assert method_config("branchgrpo", ["tree.split_plan={0: 4, 3: 4, 6: 4, 9: 4}", f"tree.roots_per_prompt={roots}"])
    with pytest.raises(ConfigError, match="leaves per prompt"):
        method_config("branchgrpo", ["tree.split_plan={0: 4, 3: 4, 6: 4, 9: 4}", f"tree.roots_per_prompt={roots + 1}"])
