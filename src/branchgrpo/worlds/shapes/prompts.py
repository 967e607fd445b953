"""Prompts of the shapes world: the grammar, :func:`parse_prompt` (prompt → :class:`SceneSpec`) and
the fixed train / held-out split.

Grammar (lower case, single spaces; articles and plurals must agree with the count)::

    prompt := group [relation group]
    group  := count colour shape[s]       count ∈ {a, one, two, three, four}
    relation ∈ {left of, right of, above, below}

At most four objects in total. Held-out prompts are whole combinations never used to pretrain the
generator nor to train RL (:data:`HELDOUT_SEED` picks them).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
MAX_OBJECTS = 4
HELDOUT_SEED = 0
NUM_HELDOUT = 24  # 8 single-group + 16 relation prompts

_GROUP = r"(a|an|one|two|three|four) (red|green|blue|yellow) (circle|square|triangle)(s?)"
_PROMPT = re.compile(rf"^{_GROUP}(?: (left of|right of|above|below) {_GROUP})?$")


@dataclass(frozen=True)
class Group:
    count: int
    colour: str
    shape: str


@dataclass(frozen=True)
class SceneSpec:
    """One or two groups; with two, ``relation`` says where group 0 lies relative to group 1."""

    groups: tuple[Group, ...]
    relation: str | None = None

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)


def group_text(group: Group) -> str:
    count = "a" if group.count == 1 else ("two", "three", "four")[group.count - 2]
    return f"{count} {group.colour} {group.shape}{'s' if group.count > 1 else ''}"


def make_prompt(spec: SceneSpec) -> str:
    """The canonical prompt of ``spec`` (``parse_prompt(make_prompt(s)) == s``)."""
    text = group_text(spec.groups[0])
    if spec.relation is not None:
        text += f" {spec.relation} {group_text(spec.groups[1])}"
    return text


def parse_prompt(prompt: str) -> SceneSpec:
    """The scene a prompt asks for.

    Raises:
        ValueError: naming the prompt when it does not follow the grammar, when count and plural
            disagree, when one group is related to an identical group, or for more than four objects.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {prompt!r} is not a string")
    text = " ".join(prompt.lower().split())
    match = _PROMPT.match(text)
    if match is None:
        raise ValueError(
            f"prompt {prompt!r} is not a shapes-world prompt; write 'COUNT COLOUR SHAPE[s] [RELATION COUNT COLOUR "
            f"SHAPE[s]]' with COUNT in a/one/two/three/four, COLOUR in {'/'.join(COLOURS)}, SHAPE in "
            f"{'/'.join(SHAPES)}, RELATION in {'/'.join(RELATIONS)}, e.g. 'two red circles left of a blue square'"
        )
    parts = match.groups()
    groups = []
    for count_word, colour, shape, plural in (parts[0:4], parts[5:9]):
        if count_word is None:
            continue
        count = COUNT_WORDS[count_word]
        if (count > 1) != (plural == "s"):
            raise ValueError(f"prompt {prompt!r}: '{count_word} ... {shape}{plural}' - the count and the plural disagree")
        groups.append(Group(count, colour, shape))
    spec = SceneSpec(tuple(groups), parts[4])
    if len(groups) == 2 and (groups[0].colour, groups[0].shape) == (groups[1].colour, groups[1].shape):
        raise ValueError(f"prompt {prompt!r} relates a group to objects of the same colour and shape; use two kinds")
    if spec.num_objects > MAX_OBJECTS:
        raise ValueError(f"prompt {prompt!r} asks for {spec.num_objects} objects; the shapes world draws at most {MAX_OBJECTS}")
    return spec


def all_specs() -> list[SceneSpec]:
    """Every scene of the grammar with relations between 1–2 objects per group (≤ 4 in all)."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    specs = [SceneSpec((Group(n, c, s),)) for n in range(1, MAX_OBJECTS + 1) for c, s in kinds]
    for relation in RELATIONS:
        for a in kinds:
            for b in kinds:
                if a == b:
                    continue
                for na, nb in ((1, 1), (2, 1), (1, 2)):
                    specs.append(SceneSpec((Group(na, *a), Group(nb, *b)), relation))
    return specs


def split_prompts() -> tuple[list[str], list[str]]:
    """``(train, heldout)`` prompts: a fixed seeded choice of 8 single-group and 16 relation prompts
    is held out; the rest is the train split."""
    specs = all_specs()
    singles = [make_prompt(s) for s in specs if s.relation is None]
    relations = [make_prompt(s) for s in specs if s.relation is not None]
    rng = random.Random(HELDOUT_SEED)
    heldout = rng.sample(singles, 8) + rng.sample(relations, NUM_HELDOUT - 8)
    held = set(heldout)
    train = [p for p in singles + relations if p not in held]
    return train, heldout


def vocabulary_words() -> list[str]:
    """Every word the grammar can use (for the word-level tokenizer)."""
    words = list(COUNT_WORDS) + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]
    for relation in RELATIONS:
        words += relation.split()
    return list(dict.fromkeys(words))
