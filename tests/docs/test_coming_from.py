"""docs/coming-from.md names only keys and presets that exist, its overrides are accepted and land
where the page says, and its worked numbers are what ``branchgrpo plan`` computes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from branchgrpo import ConfigError, load_config, method_config
from branchgrpo.config import resolve_key
from branchgrpo.families import available_families, get_family
from branchgrpo.train.config import TrainConfig
from branchgrpo.tree.nfe import plan
from branchgrpo.tree.presets import list_presets

PAGE = Path(__file__).resolve().parents[2] / "docs" / "coming-from.md"
SECTIONS = ("method", "model", "reward", "data", "eval", "run")
PRESET_LIKE = re.compile(r"^(branchgrpo|dancegrpo|mixgrpo)(-[A-Za-z0-9.]+)?$")
OURS = "branchgrpo"  # the header of the column that holds our keys and presets


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables as (header cells, body rows of cells)."""
    out: list[tuple[list[str], list[list[str]]]] = []
    block: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            rows = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            out.append((rows[0], [r for r in rows[2:]]))
        block = []
    return out


def tokens(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def is_project_key(token: str) -> bool:
    """``section.name[=value]`` with one of our config sections (their fields such as
    ``sample.num_steps`` or ``train.beta`` are not ours)."""
    key = token.split("=", 1)[0]
    return "/" not in key and " " not in key and key.split(".", 1)[0] in SECTIONS and "." in key


def family_options() -> dict[str, set[str]]:
    return {name: {f.name for f in dataclasses.fields(get_family(name).options_class)}
            for name in available_families()}


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a configuration key written out in full, or None."""
    try:
        resolved = resolve_key(TrainConfig, key)
    except ConfigError as err:
        return str(err)
    if resolved != key:
        return f"{key} is only a suffix of {resolved}; write the full key"
    if key.startswith("model.options."):
        option = key[len("model.options."):]
        if not any(option in names for names in family_options().values()):
            return f"no model family has the option {option!r}"
    return None


def preset_problem(name: str) -> str | None:
    return None if name in list_presets() else f"unknown preset {name!r}"


def ours_cell_tokens() -> list[tuple[str, list[str]]]:
    """Every backticked token of a "branchgrpo" column, with the presets named in its row."""
    out = []
    for header, rows in tables(PAGE.read_text()):
        if OURS not in header:
            continue
        column = header.index(OURS)
        for row in rows:
            row_tokens = [t for cell in row for t in tokens(cell)]
            row_presets = [t for t in row_tokens if t in list_presets()]
            out += [(t, row_presets) for t in tokens(row[column])]
    return out


def lookup(config: TrainConfig, key: str):
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node[leaf] if isinstance(node, dict) else getattr(node, leaf)


def same_value(actual, raw: str) -> bool:
    """Does the resolved value equal what the override wrote (YAML-read, as the CLI reads it)?"""
    if isinstance(actual, bool):
        return actual == yaml.safe_load(raw)
    if isinstance(actual, (int, float)):
        return actual == float(raw)
    return actual == yaml.safe_load(raw) or actual == raw


def override_problem(token: str, row_presets: list[str]) -> str | None:
    """None when ``key=value`` is accepted, alone, on a row's preset or with a row's family, and the
    resolved config holds that value; else the last error."""
    key, raw = token.split("=", 1)
    contexts: list[tuple[str | None, list[str]]] = [(None, [])] + [(p, []) for p in row_presets]
    if key.startswith("model.options."):
        option = key[len("model.options."):]
        contexts = [(None, [f"model.family={name}"]) for name, names in family_options().items() if option in names]
    if key == "run.cpu_offload":
        contexts = [(None, ["run.parallel=fsdp"])]
    error = "no context to try"
    for preset, extra in contexts:
        try:
            config = load_config(preset=preset, overrides=extra + [token])
        except ConfigError as err:
            error = str(err)
            continue
        if same_value(lookup(config, key), raw):
            return None
        error = f"{key} resolved to {lookup(config, key)!r}, not {raw!r}"
    return error


def test_page_has_its_tables_and_sources():
    text = PAGE.read_text()
    found = tables(text)
    assert sum(OURS in header for header, _ in found) >= 5
    first_column = " ".join(row[0] for _, rows in found for row in rows)
    for flag in ("--tree_split_points", "--tree_split_noise_scale", "--depth_pruning", "--width_pruning_mode",
                 "--mix_ode_sde_tree", "--tree_prob_weighted", "--sampling_steps", "--eta", "--num_generations",
                 "--timestep_fraction", "--clip_range", "--adv_clip_max", "--init_same_noise", "--shift",
                 "--learning_rate", "--gradient_accumulation_steps", "sample.num_steps", "sample.noise_level",
                 "sample.num_image_per_prompt", "sample.guidance_scale", "train.clip_range", "train.beta",
                 "train.timestep_fraction", "train.adv_clip_max", "--group_size", "--iters_per_group"):
        assert f"`{flag}`" in first_column, flag
    for repo in ("Fredreic1849/BranchGRPO", "XueZeyue/DanceGRPO", "yifan123/flow_grpo", "Tencent-Hunyuan/MixGRPO"):
        assert repo in text, repo


def test_every_token_of_our_column_is_a_key_or_a_preset():
    checked = ours_cell_tokens()
    assert len(checked) >= 80  # the page maps dozens of flags; an empty parse must not pass
    problems = []
    for token, _ in checked:
        if is_project_key(token):
            problem = key_problem(token.split("=", 1)[0])
        elif PRESET_LIKE.match(token):
            problem = preset_problem(token)
        else:
            problem = f"neither a config key nor a preset: {token!r}"
        if problem:
            problems.append(problem)
    assert problems == []


def test_every_key_and_preset_anywhere_in_the_tables_exists():
    problems = []
    for _, rows in tables(PAGE.read_text()):
        for row in rows:
            for token in (t for cell in row for t in tokens(cell)):
                if is_project_key(token):
                    problem = key_problem(token.split("=", 1)[0])
                elif PRESET_LIKE.match(token):
                    problem = preset_problem(token)
                else:
                    continue
                if problem:
                    problems.append(problem)
    assert problems == []


def test_every_override_is_accepted_and_lands_on_its_key():
    overrides = [(t, presets) for t, presets in ours_cell_tokens() if is_project_key(t) and "=" in t]
    assert len(overrides) >= 60
    problems = [f"{t}: {p}" for t, presets in overrides if (p := override_problem(t, presets))]
    assert problems == []


def test_the_checks_reject_made_up_names():
    """The checks above can fail: a wrong key, option, preset or value is reported."""
    assert key_problem("method.tree.no_such_key")
    assert key_problem("tree.eta")  # a suffix, not the key a YAML file or `train` override needs
    assert key_problem("model.options.no_such_option")
    assert key_problem("method.tree.eta") is None
    assert key_problem("model.options.guidance_scale") is None
    assert preset_problem("branchgrpo-nope")
    assert preset_problem("mixgrpo") is None
    assert override_problem("method.tree.split_noise=bogus", [])
    assert override_problem("method.tree.split_at_window_start=true", [])  # needs a window: a preset row
    assert override_problem("method.tree.split_at_window_start=true", ["mixgrpo"]) is None


def worked_rows() -> list[list[str]]:
    for header, rows in tables(PAGE.read_text()):
        if header[:3] == ["their run", "preset", "overrides"]:
            return rows
    return []


@pytest.mark.parametrize("row", worked_rows(), ids=lambda row: row[0][:40])
def test_worked_translation_numbers_are_what_plan_computes(row):
    _, preset_cell, overrides_cell, iteration, rollout_calls, trained_edges = row
    (preset,) = tokens(preset_cell)
    overrides = [t[len("method."):] for t in tokens(overrides_cell)]
    counts = plan(method_config(preset, overrides), iteration=int(iteration)).to_json()
    assert (counts["rollout_calls"], counts["trained_edges"]) == (int(rollout_calls), int(trained_edges))


def test_worked_table_is_there():
    assert len(worked_rows()) >= 5
