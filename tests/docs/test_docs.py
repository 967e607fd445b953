"""The documentation the repository ships: self-contained and generated parts current."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith((".py", ".md", ".yaml", ".js", ".txt")) and (ROOT / f).is_file()]


def test_no_citation_of_a_document_the_repository_does_not_ship():
    """Method references point at docs/method.md (and the paper), which ships with the code."""
    pattern = re.compile(r"\bSPEC(\.md)?\s*(§|\\u00a7)")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in tracked_text_files()
                 for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_method_doc_has_every_section_the_code_cites():
    sections = set(re.findall(r"^##+ §?(\d+(?:\.\d+)?)", (ROOT / "docs/method.md").read_text(), flags=re.M))
    cited = set()
    for path in tracked_text_files():
        cited |= set(re.findall(r"docs/method\.md (?:§|\\u00a7)(\d+(?:\.\d+)?)", path.read_text(errors="replace")))
    missing = sorted(c for c in cited if c not in sections and c.split(".")[0] not in sections)
    assert sections and missing == []


def test_config_reference_is_current():
    from branchgrpo.config_reference import reference_markdown

    assert (ROOT / "docs/config.md").read_text() == reference_markdown(), \
        "docs/config.md is stale: run `branchgrpo config --markdown > docs/config.md`"


def test_every_config_key_has_help():
    from branchgrpo.config_reference import key_docs
    from branchgrpo.families import available_families, get_family
    from branchgrpo.train.config import TrainConfig

    rows = key_docs(TrainConfig)
    for name in available_families():
        rows += key_docs(get_family(name).options_class, "model.options.")
    assert [r.key for r in rows if not r.help] == []


def test_every_test_file_the_docs_name_exists():
    """docs cite the tests that prove what they say; a moved or renamed test must not leave them pointing nowhere."""
    missing = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"\btests/[\w/]+\.py\b", path.read_text()):
            if not (ROOT / name).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []
