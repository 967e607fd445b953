"""Offline-first preflight: with nothing downloaded, every shipped job fails before loading anything with
one line per missing file, each with the command that fetches it (docs/reliability.md, "Nothing
downloaded yet"). No network anywhere: hub lookups go to an empty cache under tmp_path, and the fetch
commands are checked by handing them to the real `hf` command line with its download calls replaced."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from branchgrpo.cli import main
from branchgrpo.config import ConfigError, ConfigErrors
from branchgrpo.families import get_family
from branchgrpo.families.base import LOCAL_ROOTS, cached_snapshot, hf_download_command, hub_offline, looks_local
from branchgrpo.train.components import read_prompt_file, validate_job
from branchgrpo.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith(("digits", "shapes")))  # embedded worlds: nothing to download


@pytest.fixture
def empty_world(tmp_path, monkeypatch):
    """An empty working folder, offline, with an empty hub cache and rank 0."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("RANK", "HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return work


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line]


def hf_calls(monkeypatch, command: str) -> list[tuple[str, dict]]:
    """What the real `hf download` does with ``command``: the download calls it makes (replaced by recorders)."""
    cli_download = pytest.importorskip("huggingface_hub.cli.download")
    app = pytest.importorskip("huggingface_hub.cli.hf").app
    from click.testing import CliRunner

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(cli_download, "snapshot_download", lambda **kw: calls.append(("snapshot", kw)) or "/x")
    monkeypatch.setattr(cli_download, "hf_hub_download", lambda **kw: calls.append(("file", kw)) or "/x")
    words = shlex.split(command)
    assert words[:2] == ["hf", "download"], command
    result = CliRunner().invoke(app, words[1:])
    assert result.exit_code == 0, (command, result.output, result.exception)
    return calls


def backquoted(line: str) -> list[str]:
    return re.findall(r"`([^`]+)`", line)


# -- every shipped config, from an empty folder ------------------------------------------------------

def expected_problems(config_name: str) -> dict[str, str]:
    """``{line prefix: what must follow it in the same line}`` for the files the YAML names."""
    from branchgrpo.rewards.registry import reward_info

    text = (ROOT / "configs" / config_name).read_text()
    data = yaml.safe_load(text)
    family = get_family(data["model"]["family"])
    config = load_train_config(ROOT / "configs" / config_name, None, [])
    path = data["model"]["path"]
    repo = family.repo_for(config)
    documented = re.search(r"diffusers folder of (\S+)", text)
    if documented:  # the config's own comment names the repository the fetch command must name
        assert repo == documented.group(1), (config_name, repo)
    expected = {f"model.path: {path} does not exist": f"hf download {repo} --local-dir {path} --include"}
    for field in ("train_prompts", "heldout_prompts"):
        prompts = data["data"][field]
        hint = ("python scripts/fetch_hpdv2_prompts.py --out" if "hpdv2/" in prompts else
                "raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/" if "pickscore/" in prompts else
                '"prompt": "<instruction>"' if prompts.endswith(".jsonl") else "one per line")
        expected[f"data.{field}: prompt file {prompts} does not exist"] = hint
    reward = data["reward"]
    if reward_info(reward["name"]).needs_checkpoint:
        expected[f"reward.checkpoint: checkpoint {reward['checkpoint']} for reward"] = "fetch it with `"
    return expected


@pytest.mark.parametrize("config_name", CONFIGS)
def test_nothing_downloaded_lists_every_missing_file_once(empty_world, capsys, config_name):
    code, lines = run_cli(capsys, "train", "--config", str(ROOT / "configs" / config_name))
    assert code == 2
    assert all(line.startswith("branchgrpo: error: ") for line in lines), lines
    assert "Traceback" not in "\n".join(lines)
    assert len(lines) == len(set(lines)), lines  # no line twice (the edit config's JSONL was read twice)
    problems = [line.removeprefix("branchgrpo: error: ") for line in lines]
    for prefix, must in expected_problems(config_name).items():
        found = [p for p in problems if p.startswith(prefix)]
        assert len(found) == 1, (prefix, problems)
        assert must in found[0], (must, found[0])
    assert not list(empty_world.iterdir())  # nothing written, no run folder


@pytest.mark.parametrize("config_name", ["flux-dev-hps.yaml", "wan22-a14b-branchgrpo.yaml"])
def test_the_fetch_commands_are_what_hf_download_runs(empty_world, capsys, monkeypatch, config_name):
    config = load_train_config(ROOT / "configs" / config_name, None, [])
    family = get_family(config.model.family)
    code, lines = run_cli(capsys, "train", "--config", str(ROOT / "configs" / config_name))
    assert code == 2
    [model_line] = [line for line in lines if "model.path:" in line]
    [command] = [c for c in backquoted(model_line) if c.startswith("hf download")]
    [(kind, call)] = hf_calls(monkeypatch, command)
    assert kind == "snapshot" and call["repo_id"] == family.repo_for(config)
    assert call["local_dir"] == config.model.path
    assert call["allow_patterns"] == [p if "." in p else f"{p}/*" for p in family.download]
    reward_lines = [line for line in lines if "reward.checkpoint:" in line]
    if config.reward.name == "hps":
        [line] = reward_lines
        [(kind, call)] = hf_calls(monkeypatch, backquoted(line)[0])
        assert (kind, call["repo_id"], call["filename"]) == ("file", "xswu/HPSv2", "HPS_v2.1_compressed.pt")
        assert Path(call["local_dir"]) / call["filename"] == Path(config.reward.checkpoint)


def test_only_rank_zero_prints(empty_world, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    code, lines = run_cli(capsys, "train", "--config", str(ROOT / "configs" / "flux-dev-hps.yaml"))
    assert code == 2 and lines == []
    monkeypatch.setenv("RANK", "0")
    code, lines = run_cli(capsys, "train", "--config", str(ROOT / "configs" / "flux-dev-hps.yaml"))
    assert code == 2 and len(lines) >= 4


@pytest.mark.parametrize("command", ["sample", "eval", "export", "preprocess", "bench"])
def test_every_job_runs_the_preflight(empty_world, tmp_path, capsys, command):
    config = str(ROOT / "configs" / "flux-dev-hps.yaml")
    run = tmp_path / "run"  # export takes a run folder (its config.yaml), not --config
    run.mkdir()
    (run / "config.yaml").write_text((ROOT / "configs" / "flux-dev-hps.yaml").read_text())
    argv = {"export": ["export", str(run), "out", "--weights", "w.safetensors"],
            "bench": ["bench", "--out", "bench-out", "--config", config]}.get(command, [command, "--config", config])
    code, lines = run_cli(capsys, *argv)
    assert code == 2
    text = "\n".join(lines)
    assert "model.path: data/flux does not exist" in text
    assert "prompt file data/hpdv2/train_prompts.txt does not exist" in text
    assert ("reward 'hps'" in text) == (command in ("eval", "bench"))  # only jobs that score load the reward
    assert not list(empty_world.iterdir())  # bench made no output folder


# -- model folders -------------------------------------------------------------------------------------

def test_looks_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for root in LOCAL_ROOTS:
        assert looks_local(f"{root}/flux") and not Path(root).exists()
    for path in ("/abs/flux", "./flux", "../flux", "~/flux", "flux", "a/b/c"):
        assert looks_local(path), path
    for hub_id in ("black-forest-labs/FLUX.1-dev", "Qwen/Qwen-Image", "xswu/HPSv2", "Data/flux"):
        assert not looks_local(hub_id), hub_id
    (tmp_path / "Qwen").mkdir()
    assert looks_local("Qwen/Qwen-Image")  # an existing folder wins over the hub id


def test_a_local_path_never_reaches_the_hub(tmp_path, monkeypatch):
    """The loader resolves data/flux to the missing local folder (not the hub id data/flux), offline or not."""
    from branchgrpo.models.loading import ModelFilesNotFoundError
    from branchgrpo.models.flux import load_flux_adapter

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelFilesNotFoundError) as info:
        load_flux_adapter("data/flux")
    assert info.value.location == "data/flux"
    assert info.value.missing == [f"the folder {(tmp_path / 'data/flux').resolve()} itself"]


def config_for(family: str, path: Path | str, *extra: str):
    return load_train_config(None, "branchgrpo", [f"model.family={family}", f"model.path={path}", *extra])


def test_a_partial_folder_lists_each_missing_or_empty_part(tmp_path):
    folder = tmp_path / "flux"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "vae").mkdir()  # empty
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    family, config = get_family("flux"), config_for("flux", folder)
    problems = [str(p) for p in family.file_problems(config, "train")]
    parts = {"vae": "is empty", "text_encoder": "has no text_encoder/", "text_encoder_2": "has no text_encoder_2/",
             "tokenizer_2": "has no tokenizer_2/"}
    assert len(problems) == len(parts), problems
    for part, words in parts.items():
        [line] = [p for p in problems if f"--include '{part}/*'" in p]
        assert words in line and line.startswith("model.path: ")
        assert f"hf download black-forest-labs/FLUX.1-dev --local-dir {folder} --include '{part}/*'" in line
    text_only = [str(p) for p in family.file_problems(config, "preprocess")]
    assert len(text_only) == 3 and not any("vae" in p for p in text_only)  # preprocess loads no VAE


def test_wan22_parts_follow_the_variant(tmp_path):
    folder = tmp_path / "wan"
    folder.mkdir()
    family = get_family("wan22")
    a14b = [str(p) for p in family.file_problems(config_for("wan22", folder), "train")]
    ti2v = [str(p) for p in family.file_problems(config_for("wan22", folder, "model.options.variant=ti2v-5b"))]
    assert any("has no model_index.json" in p for p in a14b) and any("transformer_2/" in p for p in a14b)
    assert not any("transformer_2/" in p for p in ti2v) and len(ti2v) == len(a14b) - 1
    assert all("Wan-AI/Wan2.2-TI2V-5B-Diffusers" in p for p in ti2v)


def wan22_index(folder: Path, variant: str) -> None:
    second = ["diffusers", "WanTransformer3DModel"] if variant == "t2v-a14b" else [None, None]
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer_2": second,
                                                         "boundary_ratio": 0.875 if second[0] else None}))


def shipped_families() -> list[str]:
    """Every family this package ships that loads a diffusers folder (wan22 once per variant)."""
    from branchgrpo.families import available_families

    names = [n for n in available_families() if type(get_family(n)).__module__.startswith("branchgrpo.families.")]
    return [n for n in names if n not in ("digits", "shapes", "wan22")] + ["wan22:t2v-a14b", "wan22:ti2v-5b"]


FAMILIES = shipped_families()


@pytest.mark.parametrize("spec", FAMILIES)
@pytest.mark.parametrize("job", ["train", "preprocess"])
def test_declared_parts_are_what_the_loader_demands(tmp_path, spec, job):
    """The family's declared folder parts equal what its own build / prompt_encoder refuses to start
    without (an empty folder), and its fetch command equals the loader's download hint."""
    from branchgrpo.models.loading import ModelFilesNotFoundError

    name, _, variant = spec.partition(":")
    folder = tmp_path / "model"
    folder.mkdir()
    extra = [f"model.options.variant={variant}"] if variant else []
    if variant:
        wan22_index(folder, variant)
    family, config = get_family(name), config_for(name, folder, *extra)
    with pytest.raises(ModelFilesNotFoundError) as info:
        if job == "train":
            family.build(config, torch.device("cpu"), torch.float32)
        else:
            family.prompt_encoder(config, torch.device("cpu"), torch.float32)
    demanded = {m.rstrip("/") for m in info.value.missing}
    declared = set(family.folder_parts(config, job)) - set(family.required_files)
    assert demanded == declared
    assert [p.partition(": ")[2] for p in map(str, family.file_problems(config, job))] == [
        f"{folder} has no {part}/ subfolder; fetch it with `{hf_download_command(family.repo_for(config), str(folder), (part,))}`"
        for part in family.folder_parts(config, job) if part not in family.required_files]
    files = info.value.files
    assert [p if "." in p else f"{p}/*" for p in family.download] == list(files.download_patterns)
    assert family.gated == files.gated
    if variant != "ti2v-5b":  # the loader's hint names the default repository; ti2v-5b has its own
        assert family.repo_for(config) == files.hub_id


# -- hub ids and the local hub cache -------------------------------------------------------------------

def fake_cached_repo(cache: Path, repo_id: str, parts: dict[str, str]) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, text in parts.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    return snapshot


def test_hub_ids_are_looked_up_in_the_local_cache_only_offline(tmp_path, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    repo = "someone/flux-copy"
    family, config = get_family("flux"), config_for("flux", repo)
    assert not hub_offline() and family.file_problems(config) == []  # online: the loader downloads it
    assert cached_snapshot(repo) is None
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline()
    [problem] = map(str, family.file_problems(config))
    assert f"{repo} is not in the local Hugging Face cache ({cache})" in problem
    assert f"`hf download {repo} --include 'model_index.json' --include 'transformer/*'" in problem
    assert "--local-dir" not in problem  # into the cache, where the hub id is looked up

    snapshot = fake_cached_repo(cache, repo, {"model_index.json": "{}", "transformer/config.json": "{}",
                                              "vae/config.json": "{}", "text_encoder/config.json": "{}"})
    assert try_to_load_from_cache(repo, "model_index.json", cache_dir=cache) == str(snapshot / "model_index.json")
    assert cached_snapshot(repo) == snapshot
    problems = [str(p) for p in family.file_problems(config)]
    assert len(problems) == 3 and all(f"{repo} (cached in {snapshot}) has no" in p for p in problems)
    assert {re.search(r"has no (\w+)/", p).group(1) for p in problems} == {"text_encoder_2", "tokenizer", "tokenizer_2"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline() and family.file_problems(config) == []


# -- reward checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, checkpoint, repo, target", [
    ("hps", "hps_ckpt/HPS_v2.1_compressed.pt", "xswu/HPSv2", "hps_ckpt"),
    ("pickscore", "models/PickScore_v1/model.safetensors", "yuvalkirstain/PickScore_v1", "models/PickScore_v1"),
    ("pickscore", "models/PickScore_v1", "yuvalkirstain/PickScore_v1", "models/PickScore_v1"),
    ("imagereward", "models/ImageReward/ImageReward.pt", "THUDM/ImageReward", "models/ImageReward"),
    ("clip", "models/clip-vit-large-patch14", "openai/clip-vit-large-patch14", "models/clip-vit-large-patch14"),
    ("geneval", "models/owlv2", "google/owlv2-base-patch16-ensemble", "models/owlv2"),
])
def test_reward_fetch_commands(monkeypatch, name, checkpoint, repo, target):
    from branchgrpo.rewards.registry import reward_info

    command = reward_info(name).fetch_hint(checkpoint).split("; ")[0]
    [(kind, call)] = hf_calls(monkeypatch, command)
    assert (call["repo_id"], call["local_dir"]) == (repo, target)
    if kind == "file":
        assert Path(target) / call["filename"] == Path(checkpoint)


def test_missing_reward_checkpoints_say_how_to_fetch_them(tmp_path, monkeypatch):
    from branchgrpo.rewards.registry import _META, _REGISTRY, register_reward, reward_info
    from branchgrpo.train.components import reward_problems

    monkeypatch.chdir(tmp_path)
    head = "models/aesthetic/sac+logos+ava1-l14-linearMSE.pth"
    config = load_train_config(None, "branchgrpo", ["reward.name=aesthetic", f"reward.checkpoint={head}"])
    [problem] = map(str, reward_problems(config, "image"))
    assert problem.startswith(f"reward.checkpoint: checkpoint {head} for reward 'aesthetic' does not exist; fetch it")
    assert (f"curl -L --create-dirs -o {head} https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
            "main/sac%2Blogos%2Bava1-l14-linearMSE.pth") in problem
    frames = config_for("wan", "x", "reward.name=frames", "reward.options.image_reward=hps",
                        "reward.checkpoint=ckpt/HPS_v2.1_compressed.pt")
    [problem] = map(str, reward_problems(frames, "video"))
    assert "`hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir ckpt`" in problem  # the image reward's
    try:
        register_reward("mine-preflight", "branchgrpo.rewards.hps:HPSReward", needs_checkpoint=True,
                        fetch="get-mine --into {folder} --as {path}")
        assert reward_info("mine-preflight").fetch_hint("w/x.pt") == "get-mine --into w --as w/x.pt"
        assert reward_info("hps").fetch_hint("x.pt") == "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir ."
    finally:
        _REGISTRY.pop("mine-preflight", None)
        _META.pop("mine-preflight", None)


# -- prompt files --------------------------------------------------------------------------------------

def test_duplicate_problems_are_reported_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_for("qwenimage-edit", "data/qwen-image-edit", "data.train_prompts=data/edit/train.jsonl")
    with pytest.raises(ConfigErrors) as info:
        validate_job(config, custom_reward=True)
    lines = str(info.value).splitlines()
    assert sum("data/edit/train.jsonl" in line for line in lines) == 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "make it blue", "image": "nowhere.png"}\n')
    config.data.train_prompts = str(rows)
    with pytest.raises(ConfigErrors) as info:
        validate_job(config, custom_reward=True)
    assert any("nowhere.png" in line for line in str(info.value).splitlines())  # the rows are still checked


def test_prompt_cache_is_a_note_in_a_failing_list_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_for("flux", "data/flux", "model.prompt_cache_dir=data/cache", "data.train_prompts=p.txt")
    with pytest.raises(ConfigErrors) as info:
        validate_job(config, custom_reward=True)
    [note] = [e for e in info.value.errors if e.field == "model.prompt_cache_dir"]
    assert "not an error by itself" in str(note) and "branchgrpo preprocess" in str(note)
    with pytest.raises(ConfigError) as info:
        validate_job(config, custom_reward=True, job="preprocess")  # preprocess fills it: no note
    assert "prompt_cache_dir" not in str(info.value)


def load_fetch_script():
    spec = importlib.util.spec_from_file_location("fetch_hpdv2_prompts", ROOT / "scripts" / "fetch_hpdv2_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hpdv2_json_to_prompt_files(tmp_path, capsys):
    script = load_fetch_script()
    styles = {
        "anime": ["a cat  in\na hat", "a dog", "", "# not a comment", "a fox", "a dog"],
        "concept-art": ["a castle", "a cat in a hat", "a dragon", "a tower"],
        "paintings": ["a lake"],
        "photo": ["a car", "a bus", "a train"],
    }
    source = tmp_path / "json"
    source.mkdir()
    for style, prompts in styles.items():
        (source / f"{style}.json").write_text(json.dumps(prompts))
    assert script.main(["--from", str(source), "--out", str(tmp_path / "out"), "--test-per-style", "1"]) == 0
    train = read_prompt_file(str(tmp_path / "out" / "train_prompts.txt"), "data.train_prompts")
    test = read_prompt_file(str(tmp_path / "out" / "test_prompts.txt"), "data.heldout_prompts")

    def sha(p):
        return hashlib.sha256(p.encode("utf-8")).hexdigest()

    kept = {"anime": ["a cat in a hat", "a dog", "a fox"], "concept-art": ["a castle", "a dragon", "a tower"],
            "paintings": ["a lake"], "photo": ["a car", "a bus", "a train"]}  # collapsed, deduplicated, '#' dropped
    held = [min(prompts, key=sha) for prompts in kept.values()]
    assert test == held
    assert train == [p for prompts in kept.values() for p in prompts if p not in held]
    assert "2 empty or '#' prompts dropped" in capsys.readouterr().out
    # the split depends on the prompts, not on their order in the files
    again, _, _ = script.split_prompts({s: list(reversed(p)) for s, p in styles.items()}, 1)
    assert sorted(again) == sorted(train)
    (source / "photo.json").write_text('{"not": "a list"}')
    assert script.main(["--from", str(source), "--out", str(tmp_path / "bad")]) == 1
    assert "expected a JSON list of prompt strings" in capsys.readouterr().err


def test_a_reward_space_diversity_bonus_needs_a_reward_with_an_embedding():
    """``advantage.diversity_space=reward`` with a reward that has no image embedding is one line, before
    anything loads; digits (and a list with one embedding component) passes."""
    from branchgrpo.train.components import reward_problems

    bonus = ["advantage.diversity_bonus=0.1", "advantage.diversity_space=reward"]
    shapes = load_train_config(None, "branchgrpo", ["model.family=shapes", "reward.name=shapes", *bonus])
    [problem] = map(str, reward_problems(shapes, "image"))
    assert problem.startswith("advantage.diversity_space: 'reward' measures the bonus in the reward model's image "
                              "embedding, which reward.name='shapes' does not have; rewards with one: ")
    assert all(name in problem for name in ("hps", "pickscore", "clip", "digits")) and "'shapes'" in problem
    assert "geneval" not in problem.split("rewards with one: ")[1]
    digits = load_train_config(None, "branchgrpo", bonus)
    assert reward_problems(digits, "image") == []
    off = load_train_config(None, "branchgrpo", ["model.family=shapes", "reward.name=shapes",
                                                 "advantage.diversity_space=reward"])
    assert reward_problems(off, "image") == []  # bonus off: the space is not used
