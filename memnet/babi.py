"""The bAbI QA tasks (Weston et al. 2015, arXiv 1502.05698): reading the files, splitting
off validation stories, and the events a story becomes (statements are writes, questions
are queries on the story's own memory).

File format: "ID text" lines; a question line is "ID question<TAB>answer<TAB>support IDs";
IDs restart at 1 for each new story; support IDs name statements of the same story.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from memnet.errors import MemnetError

_CHECKOUT = Path(__file__).resolve().parents[1]


def shared_path(relative: str) -> Path:
    """A directory the project ships (``data/babi/en``, ``models/babi``): the checkout's own
    in a source tree or an editable install, else the copy a non-editable install put under
    ``{prefix}/share/memnet`` (pyproject.toml's data-files). The checkout's path, which does
    not exist, when neither is there."""
    checkout = _CHECKOUT / relative
    if (_CHECKOUT / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        installed = Path(sysconfig.get_path("data", scheme)) / "share" / "memnet" / relative
        if installed.is_dir():
            return installed
    return checkout


DATA = shared_path("data/babi/en")  # the bAbI 1k training files (CC BY 3.0, see ../ATTRIBUTION.md)
MODELS = shared_path("models/babi")  # the shipped models, qaN.safetensors

TASKS = range(1, 21)
NAMES = {
    1: "single supporting fact",
    2: "two supporting facts",
    3: "three supporting facts",
    4: "two argument relations",
    5: "three argument relations",
    6: "yes/no questions",
    7: "counting",
    8: "lists/sets",
    9: "simple negation",
    10: "indefinite knowledge",
    11: "basic coreference",
    12: "conjunction",
    13: "compound coreference",
    14: "time reasoning",
    15: "basic deduction",
    16: "basic induction",
    17: "positional reasoning",
    18: "size reasoning",
    19: "path finding",
    20: "agent's motivation",
}
# Each training file's stories, in the file's order: training, then validation (early
# stopping and the choice of seed), then held out (never seen by training or by any choice:
# the honest score, as our copy of bAbI has no test split).
VALIDATION_SHARE = 0.15
HOLDOUT_SHARE = 0.1


class BabiError(MemnetError):
    """A bAbI file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    support: tuple[int, ...]  # indices into the story's statements, in the file's order
    after: int  # how many statements precede the question


@dataclass
class Story:
    statements: list[str] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


def task_file(data: Path, task: int) -> Path:
    """The training file of a task in a bAbI directory (en/ or en-10k/)."""
    if not Path(data).is_dir():
        raise BabiError(f"{data}: no such bAbI directory")
    found = sorted(Path(data).glob(f"qa{task}_*_train.txt"))
    if len(found) != 1:
        raise BabiError(f"{data}: expected one qa{task}_*_train.txt, found {len(found)}")
    return found[0]


def read_stories(path: Path) -> list[Story]:
    stories: list[Story] = []
    numbers: dict[int, int] = {}  # file ID -> statement index, in the current story
    lines = Path(path).read_text(encoding="utf-8-sig").split("\n")  # not splitlines: U+2028
    for n, line in enumerate(lines, 1):  # and the like are text, not line ends
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        head, _, rest = line.partition(" ")
        if not (head.isascii() and head.isdigit()) or not rest:
            raise BabiError(f"{path}:{n}: expected 'ID text'")
        if int(head) == 1 or not stories:
            stories.append(Story())
            numbers = {}
        story = stories[-1]
        if "\t" not in rest:
            numbers[int(head)] = len(story.statements)
            story.statements.append(rest.strip())
            continue
        parts = rest.split("\t")
        if len(parts) < 3:
            raise BabiError(f"{path}:{n}: a question needs 'question<TAB>answer<TAB>IDs'")
        if not parts[1].strip():
            raise BabiError(f"{path}:{n}: a question without an answer")
        try:
            ids = [int(i) if i.isascii() and i.isdigit() else -1 for i in parts[2].split()]
            support = tuple(numbers[i] for i in ids)
        except KeyError:
            raise BabiError(
                f"{path}:{n}: supporting fact IDs {parts[2]!r} name no statement"
            ) from None
        story.questions.append(
            Question(parts[0].strip(), parts[1].strip(), support, len(story.statements))
        )
    if not stories:
        raise BabiError(f"{path}: no stories")
    return stories


class Split(NamedTuple):
    train: list[Story]
    validation: list[Story]
    holdout: list[Story]


def split(stories: list[Story]) -> Split:
    """The last HOLDOUT_SHARE of the stories are held out, the VALIDATION_SHARE before them
    validate, the rest train (each part at least one story where there are three)."""
    n = len(stories)
    held = max(1, round(n * HOLDOUT_SHARE)) if n >= 3 else 0
    val = max(1, round(n * VALIDATION_SHARE)) if n >= 2 else 0
    a, b = n - held - val, n - held
    return Split(stories[:a], stories[a:b], stories[b:])


def events(story: Story, memory: str, prefix: str) -> list[dict]:
    """The story as protocol events in reading order: statements as writes, each question
    as a query with id f"{prefix}{question number}" (answers are not sent)."""
    out: list[dict] = []
    done = 0
    for number, question in enumerate(story.questions):
        for text in story.statements[done : question.after]:
            out.append({"op": "write", "memory": memory, "text": text})
        done = question.after
        out.append(
            {"op": "query", "memory": memory, "id": f"{prefix}{number}", "text": question.text}
        )
    return out
