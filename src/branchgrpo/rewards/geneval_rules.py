"""GenEval's prompt grammar and scoring rules as pure functions (no models, no tensors).

The ``geneval`` reward (:mod:`branchgrpo.rewards.geneval`) detects objects and classifies their
colours; everything after that lives here: parse a prompt into object clauses, keep the detections
GenEval keeps, and score them three ways (docs/rewards.md, "Compositional correctness").

Facts from GenEval (github.com/djghosh13/geneval, MIT, ``prompts/create_prompts.py`` and
``evaluation/evaluate_images.py``) and from Flow-GRPO's GenEval reward (github.com/yifan123/reward-server,
MIT, ``reward_server/gen_eval.py`` ``evaluate_reward``); the code here is our own.

Prompts (``with_article``: "an" before a vowel; ``make_plural``: "+es" after a final "s", else "+s"):

=============  ==============================================  ====================================
tag            prompt                                          clauses
=============  ==============================================  ====================================
single_object  a photo of a cat                                cat ≥ 1
two_object     a photo of a cat and a dog                      cat ≥ 1, dog ≥ 1
counting       a photo of three cats                           cat == 3 (include 3, exclude 4)
colors         a photo of a red car                            car ≥ 1, red
position       a photo of a cat left of a dog                  dog ≥ 1; cat ≥ 1, left of clause 0
color_attr     a photo of a red car and a blue bench           car ≥ 1, red; bench ≥ 1, blue
=============  ==============================================  ====================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

# evaluation/object_names.txt: the 80 COCO classes as GenEval names them
OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's colour classifier: CLIP zero-shot over COLORS with these templates per object class
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object",
)
PREFIX = "a photo of "


def make_plural(name: str) -> str:
    """GenEval's plural: ``"+es"`` after a final ``s`` (``"buses"``, ``"skises"``), else ``"+s"`` (``"sheeps"``)."""
    return name + "es" if name.endswith("s") else name + "s"


# -- parsed prompts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectClause:
    """One object the prompt asks for: ``count`` of ``name`` (exactly ``count`` when ``exact``),
    optionally all of colour ``colour``, optionally ``position = (relation, target clause index)``."""

    name: str
    count: int = 1
    exact: bool = False
    colour: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class GenEvalPrompt:
    """A prompt's GenEval tag and object clauses (clause order as GenEval's ``include`` list)."""

    tag: str
    clauses: tuple[ObjectClause, ...]

    def to_metadata(self) -> dict[str, Any]:
        """GenEval's ``evaluation_metadata.jsonl`` row without ``prompt``: ``include``, ``exclude``."""
        include = []
        for clause in self.clauses:
            row: dict[str, Any] = {"class": clause.name, "count": clause.count}
            if clause.colour is not None:
                row["color"] = clause.colour
            if clause.position is not None:
                row["position"] = [clause.position[0], clause.position[1]]
            include.append(row)
        metadata: dict[str, Any] = {"tag": self.tag, "include": include}
        exclude = [{"class": c.name, "count": c.count + 1} for c in self.clauses if c.exact]
        if exclude:
            metadata["exclude"] = exclude
        return metadata

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> GenEvalPrompt:
        """From a GenEval metadata row; an ``exclude`` must be ``count + 1`` of an included class
        (the only kind GenEval writes: counting prompts)."""
        clauses = []
        for row in metadata["include"]:
            position = row.get("position")
            clauses.append(ObjectClause(
                name=row["class"], count=int(row["count"]), colour=row.get("color"),
                position=None if position is None else (str(position[0]), int(position[1]))))
        for row in metadata.get("exclude", []):
            match = [i for i, c in enumerate(clauses) if c.name == row["class"] and c.count + 1 == int(row["count"])]
            if not match:
                raise ValueError(f"exclude {row} is not 'count + 1' of an included class; "
                                 "only counting excludes are supported")
            clauses[match[0]] = replace(clauses[match[0]], exact=True)
        return cls(tag=str(metadata["tag"]), clauses=tuple(clauses))


def _noun_phrase(words: list[str], names: Mapping[str, str], plurals: Mapping[str, str]) -> ObjectClause | None:
    """``a|an [colour] NAME`` or ``NUMBER [colour] NAMES`` → a clause; None if it is neither."""
    if len(words) < 2:
        return None
    head, rest = words[0], words[1:]
    if head in ("a", "an"):
        count, exact, lookup = 1, False, names
    elif head in NUMBERS[1:] or (head.isdigit() and int(head) > 0):
        count = NUMBERS.index(head) if head in NUMBERS else int(head)
        exact, lookup = True, (names if count == 1 else plurals)
    else:
        return None
    text = " ".join(rest)
    if text in lookup:  # "an orange" is the fruit, "an orange orange" a coloured one
        return ObjectClause(lookup[text], count, exact)
    if rest[0] in COLORS and " ".join(rest[1:]) in lookup:
        return ObjectClause(lookup[" ".join(rest[1:])], count, exact, colour=rest[0])
    return None


def parse_prompt(prompt: str, classes: Sequence[str] = OBJECT_NAMES) -> GenEvalPrompt:
    """GenEval's clauses from a prompt in its grammar (module docstring); ValueError if it is not.

    Lower-cased, whitespace collapsed, a final ``.`` and the ``"a photo of "`` prefix dropped.
    Plurals are GenEval's (:func:`make_plural`) or the name itself (``"two sheep"``). Beyond
    GenEval's templates: digits (``"3 cats"``), a colour on any object, more than two objects
    joined by ``and``. Tag: ``position`` with a relation, else ``counting`` if a count is given,
    ``color_attr`` / ``two_object`` for several objects with / without colours, ``colors`` /
    ``single_object`` for one.
    """
    names = {name.lower(): name for name in classes}
    plurals = {**names, **{make_plural(key): name for key, name in names.items()}}
    text = " ".join(prompt.lower().split()).rstrip(".").strip()
    body = text.removeprefix(PREFIX)
    expected = ("expected GenEval's grammar: 'a photo of a cat', 'a photo of two dogs', 'a photo of a red car', "
                "'a photo of a cat and a dog', 'a photo of a cat left of a dog' (objects from the class list)")
    for relation in RELATIONS:
        marker = f" {relation} "
        if marker in body:
            subject, _, target = body.partition(marker)
            a = _noun_phrase(subject.split(), names, plurals)
            b = _noun_phrase(target.split(), names, plurals)
            if a is None or b is None:
                raise ValueError(f"cannot parse {prompt!r}: {expected}")
            return GenEvalPrompt("position", (b, ObjectClause(a.name, a.count, a.exact, a.colour, (relation, 0))))
    parts = [_noun_phrase(part.split(), names, plurals) for part in body.split(" and ")]
    if not parts or any(p is None for p in parts):
        raise ValueError(f"cannot parse {prompt!r}: {expected}")
    if any(p.exact for p in parts):
        tag = "counting"
    elif len(parts) > 1:
        tag = "color_attr" if any(p.colour for p in parts) else "two_object"
    else:
        tag = "colors" if parts[0].colour else "single_object"
    return GenEvalPrompt(tag, tuple(parts))


# -- detections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` ``(x0, y0, x1, y1)`` in pixels, its score, its colour (or None
    when it was not classified)."""

    box: tuple[float, float, float, float]
    score: float
    colour: str | None = None


Objects = Mapping[str, Sequence[Detection]]  # class name -> its detections, highest score first


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (``x1 - x0 + 1`` wide), as its NMS uses."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(boxes: Sequence[Sequence[float]], scores: Sequence[float], labels: Sequence[int],
                   classes: Sequence[str], *, threshold: float, max_objects: int = 16,
                   nms_iou: float = 1.0) -> dict[str, list[Detection]]:
    """GenEval's per-class selection: score ``> threshold``, highest first, the first ``max_objects``,
    then greedy NMS dropping boxes with IoU ``>= nms_iou`` to a kept one (``1.0``: none, as GenEval).

    ``boxes [N, 4]``, ``scores [N]``, ``labels [N]`` (indices into ``classes``); classes with no
    detection are absent from the result.
    """
    objects: dict[str, list[Detection]] = {}
    for index, name in enumerate(classes):
        mine = [i for i, label in enumerate(labels) if int(label) == index and float(scores[i]) > threshold]
        order = sorted(mine, key=lambda i: -float(scores[i]))[:max_objects]
        kept: list[int] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if nms_iou < 1.0:
                order = [i for i in order if box_iou(boxes[best], boxes[i]) < nms_iou]
        if kept:
            objects[name] = [Detection(tuple(float(v) for v in boxes[i]), float(scores[i])) for i in kept]
    return objects


def colour_requests(prompt: GenEvalPrompt, objects: Objects) -> list[tuple[str, int]]:
    """``(class, index)`` of the detections whose colour the scoring reads: the first ``count``
    detections of every clause that asks for a colour (as GenEval classifies them)."""
    wanted: dict[tuple[str, int], None] = {}
    for clause in prompt.clauses:
        if clause.colour is not None:
            for index in range(min(len(objects.get(clause.name, ())), clause.count)):
                wanted[(clause.name, index)] = None
    return list(wanted)


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """GenEval's relations of box A to box B: the centre offset, each axis shrunk towards 0 by
    ``threshold`` × the summed box sizes on that axis, over the offset's length; a component below
    −0.5 / above 0.5 is ``left of`` / ``right of`` (x) or ``above`` / ``below`` (y, pointing down).
    Empty when both shrunk components are under 1e-3 (the boxes are too close to say)."""
    offset = [(box_a[k] + box_a[k + 2]) / 2 - (box_b[k] + box_b[k + 2]) / 2 for k in (0, 1)]
    size = [abs(box_a[k + 2] - box_a[k]) + abs(box_b[k + 2] - box_b[k]) for k in (0, 1)]
    shrunk = [math.copysign(max(abs(o) - threshold * s, 0.0), o) if o else 0.0 for o, s in zip(offset, size)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    length = math.hypot(*offset)
    dx, dy = shrunk[0] / length, shrunk[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _colours(objects: Objects, clause: ObjectClause, n: int) -> list[str]:
    found = list(objects.get(clause.name, ()))[:n]
    if any(d.colour is None for d in found):
        raise ValueError(f"detections of {clause.name!r} need colours (see colour_requests) to score {clause}")
    return [d.colour for d in found]


# -- scores -----------------------------------------------------------------------------------


def geneval_correct(prompt: GenEvalPrompt, objects: Objects, position_threshold: float = 0.1) -> bool:
    """GenEval's binary verdict (``evaluate``): every clause has at least ``count`` detections, the
    first ``count`` all of its colour, each of them in its relation to each of the target clause's
    first ``count`` (the target clause itself passed); an exact clause has fewer than ``count + 1``."""
    passed: list[bool] = []
    for clause in prompt.clauses:
        found = list(objects.get(clause.name, ()))[:clause.count]
        ok = len(found) >= clause.count
        if ok and clause.colour is not None:
            ok = _colours(objects, clause, clause.count).count(clause.colour) >= clause.count
        if ok and clause.position is not None:
            relation, target = clause.position
            ok = target < len(passed) and passed[target] and all(
                relation in relative_position(a.box, b.box, position_threshold)
                for a in found for b in list(objects[prompt.clauses[target].name])[:prompt.clauses[target].count])
        passed.append(ok)
    exclusions = all(len(objects.get(c.name, ())) < c.count + 1 for c in prompt.clauses if c.exact)
    return all(passed) and exclusions


@dataclass(frozen=True)
class PartialCredit:
    """Per-requirement credits in [0, 1] (``items``: ``(kind, credit)``), their mean ``total`` and
    the mean per kind (``object``, ``count``, ``colour``, ``position``; None: the prompt has none)."""

    items: tuple[tuple[str, float], ...]

    @property
    def total(self) -> float:
        return sum(credit for _, credit in self.items) / len(self.items)

    def component(self, kind: str) -> float | None:
        credits = [credit for k, credit in self.items if k == kind]
        return sum(credits) / len(credits) if credits else None


KINDS: tuple[str, ...] = ("object", "count", "colour", "position")


def partial_credit(prompt: GenEvalPrompt, objects: Objects, position_threshold: float = 0.1) -> PartialCredit:
    """One credit per requirement GenEval checks (``n``: detections of the clause's class, ``N``: its count):

    * ``object`` (count 1, not exact): ``min(n, N) / N`` — 1 if the object is there;
    * ``count`` (an exact count, or N > 1): exact ``max(0, 1 - |n - N| / N)``, else ``min(n, N) / N``;
    * ``colour``: the share of the first ``min(n, N)`` detections classified as the colour, over ``N``;
    * ``position``: the share of the ``N_a × N_b`` pairs (first ``N`` of each clause) in the relation.

    Every credit is 1 exactly when GenEval's check passes, so ``total == 1`` iff :func:`geneval_correct`.
    """
    items: list[tuple[str, float]] = []
    for clause in prompt.clauses:
        n = len(objects.get(clause.name, ()))
        count = clause.count
        if clause.exact:
            items.append(("count", max(0.0, 1.0 - abs(n - count) / count)))
        else:
            items.append(("count" if count > 1 else "object", min(n, count) / count))
        if clause.colour is not None:
            items.append(("colour", _colours(objects, clause, count).count(clause.colour) / count))
        if clause.position is not None:
            relation, target_index = clause.position
            target = prompt.clauses[target_index]
            subjects = list(objects.get(clause.name, ()))[:count]
            targets = list(objects.get(target.name, ()))[:target.count]
            hits = sum(relation in relative_position(a.box, b.box, position_threshold)
                       for a in subjects for b in targets)
            items.append(("position", hits / (count * target.count)))
    return PartialCredit(tuple(items))


def flow_grpo_score(prompt: GenEvalPrompt, objects: Objects, position_threshold: float = 0.1) -> float:
    """Flow-GRPO's training score (``evaluate_reward``'s ``score``): the mean of a list built per clause:

    * ``1 - |N - n| / N`` (negative when ``n > 2N``; every count is exact here, even "a cat");
    * if ``n != N`` and the clause has a colour or position: ``0``; otherwise
    * colour: ``1 - |N - k| / N`` with ``k`` of the ``n`` detections in the colour;
    * position (if the colour passed): ``0`` when the target clause failed; else ``0`` at the first
      pair not in the relation, and then ``1`` whether a pair failed or not (a failed position adds
      two entries, 0 and 1).
    """
    values: list[float] = []
    matched: list[list[Detection] | None] = []
    for clause in prompt.clauses:
        found = list(objects.get(clause.name, ()))
        count = clause.count
        ok = len(found) == count
        values.append(1.0 - abs(count - len(found)) / count)
        if not ok:
            if clause.colour is not None or clause.position is not None:
                values.append(0.0)
        else:
            if clause.colour is not None:
                hits = _colours(objects, clause, count).count(clause.colour)
                values.append(1.0 - abs(count - hits) / count)
                ok = hits == count
            if clause.position is not None and ok:
                relation, target = clause.position
                if matched[target] is None:
                    ok = False
                    values.append(0.0)
                else:
                    failed = next((True for a in found for b in matched[target]
                                   if relation not in relative_position(a.box, b.box, position_threshold)), False)
                    if failed:
                        ok = False
                        values.append(0.0)
                    values.append(1.0)
        matched.append(found if ok else None)
    return sum(values) / len(values) if values else 0.0
