"""Presets, overrides and validation: every bad input is one clear ConfigError naming the field."""

import pytest

from branchgrpo.config import ConfigError
from branchgrpo.tree.presets import TABLE1_PRESETS, list_presets, method_config


def test_every_table1_preset_and_split_preset_exists():
    names = set(list_presets())
    expected = set(TABLE1_PRESETS) | {
        "branchgrpo-dense", "branchgrpo-mixed", "branchgrpo-sparse", "branchgrpo-k3", "branchgrpo-k4",
    }
    assert expected <= names
    for name in names:
        assert method_config(name).name == name


@pytest.mark.parametrize(
    "preset, plan, leaves",
    [
        ("branchgrpo-dense", {0: 2, 3: 2, 6: 2, 9: 2}, 16),
        ("branchgrpo-mixed", {0: 2, 4: 2, 8: 2, 12: 2}, 16),
        ("branchgrpo-sparse", {0: 2, 5: 2, 10: 2, 15: 2}, 16),
        ("branchgrpo-k3", {0: 3, 3: 3, 6: 3, 9: 3}, 81),
        ("branchgrpo-k4", {0: 4, 3: 4, 6: 4, 9: 4}, 256),
        ("dancegrpo", {0: 16}, 16),
    ],
)
def test_split_plans_replace_rather_than_merge(preset, plan, leaves):
    cfg = method_config(preset)
    assert cfg.tree.split_plan == plan
    assert cfg.tree.leaves_per_prompt() == leaves


def test_overrides_dotted_suffix_and_typed():
    cfg = method_config("branchgrpo", ["tree.steps=16", "eta=0.5", "split_plan=0:3,4:2", "width_pruning=extreme"])
    assert cfg.tree.steps == 16 and cfg.tree.eta == 0.5
    assert cfg.tree.split_plan == {0: 3, 4: 2}
    assert cfg.selection.width_pruning == "extreme"
    cfg = method_config("branchgrpo", ["tree.sde_window.size=3", "skip_zero_advantage=false"])
    assert cfg.tree.sde_window.size == 3 and cfg.selection.skip_zero_advantage is False
    cfg = method_config("branchgrpo-mix", ["tree.sde_window=null"])
    assert cfg.tree.sde_window is None


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (["split_plan=0:2,20:2"], "tree.split_plan", "0..19"),
        (["split_plan=0:1"], "tree.split_plan", ">= 2"),
        (["split_plan=0:2,0:3"], "tree.split_plan", "duplicate"),
        (["split_plan={0: 2, 0: 3}"], "", "duplicate"),
        (["split_noise_scale=-1"], "tree.split_noise_scale", ">= 0"),
        (["split_noise=wild"], "tree.split_noise", "correlated"),
        (["steps=abc"], "tree.steps", "integer"),
        (["tree.stepz=3"], "tree.stepz", "tree.steps"),
        (["nonsense=3"], "nonsense", "unknown key"),
        (["stop=3"], "stop", "ambiguous"),
        (["width_pruning=top"], "selection.width_pruning", "parent_top1"),
        (["depth_pruning.size=30"], "selection.depth_pruning.size", "1..20"),
        (["depth_pruning.start=0"], "selection.depth_pruning.start", "1..20"),
        (["tree.sde_window.size=25"], "tree.sde_window.size", "1..20"),
        (["tree.sde_window.start=19"], "tree.sde_window.start", "fits"),
        (["timestep_fraction=0"], "selection.timestep_fraction", "(0, 1]"),
        (["clip_range=0"], "update.clip_range", "> 0"),
        (["train_micro_batch=0"], "engine.train_micro_batch", ">= 1"),
        (["steps"], "steps", "key=value"),
    ],
)
def test_bad_specs_raise_one_clear_error(overrides, field, words):
    with pytest.raises(ConfigError) as info:
        method_config("branchgrpo", overrides)
    if field:
        assert info.value.field == field
    assert words in str(info.value)


def test_depth_pruning_window_is_clamped_by_stop():
    cfg = method_config("branchgrpo-deppru", ["depth_pruning.start=18", "depth_pruning.size=5"])
    assert list(cfg.selection.depth_pruning.window(0, cfg.tree)) == [16, 17, 18, 19, 20]


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'branchgrpo-mix'"):
        method_config("branchgrpo-mixx")


def test_a_prompts_per_iteration_override_that_prompts_per_process_would_hide_is_refused():
    from branchgrpo.config import ConfigError
    from branchgrpo.train.config import load_train_config

    with pytest.raises(ConfigError, match=r"data.prompts_per_iteration: the override would be ignored: "
                                          r"data.prompts_per_process=1 takes precedence"):
        load_train_config("configs/flux-dev-hps.yaml", None, ["data.prompts_per_iteration=16"])
    both = load_train_config("configs/flux-dev-hps.yaml", None,
                             ["data.prompts_per_iteration=16", "data.prompts_per_process=0"])
    assert both.data.global_prompts(8) == 16
    assert load_train_config("configs/flux-dev-hps.yaml").data.global_prompts(8) == 8  # the file alone: 1 per process
