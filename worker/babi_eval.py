"""``memnet eval-babi``: score models on bAbI by streaming each story into its own memory
through Redis and workers (statements as writes, questions as queries), reading the answers
from the response streams. ``--in-process`` runs the same events through the library's
engine without Redis; ``--both`` runs both and checks that they agree answer for answer.

Scores the held-out stories (the tail of each training file that ``memnet train`` neither
trains on nor chooses by: memnet.babi.split) unless ``--split`` says otherwise.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

from memnet import Answer, Engine, InvalidInput, Memory, babi, load_model
from memnet.babi import NAMES, BabiError, Story, events, read_stories, split, task_file
from worker.local import collect, local_redis, local_workers, send

DATA, MODELS = babi.DATA, babi.MODELS  # the checkout's, else the copies installed with memnet

Answers = dict[str, str | None]  # query id -> answer (None: an error response)


def stories_of(data: Path, task: int, which: str) -> list[Story]:
    stories = read_stories(task_file(data, task))
    parts = split(stories)
    return {**parts._asdict(), "all": stories}[which]


def data_for(data: Path | None, task: int, model: Path | None = None) -> Path:
    """Where task's stories are: data; else (None) the directory the model was trained on,
    as its summary (qaN.json beside it) records it (BabiError if this checkout lacks it: other
    files could hold its training stories); else the 1k files. A data directory without the
    task's file (bAbI 10k lacks qa3 here; scripts/train_babi.py --tenk trains it on 1k) also
    falls back to the 1k files."""
    if data is None:
        data = DATA
        summary = model.with_suffix(".json") if model is not None else None
        if summary is not None and summary.is_file():
            trained = json.loads(summary.read_text()).get("data", "")
            if isinstance(trained, dict):  # a joint model: each task's file
                trained = trained.get(f"qa{task}", "")
            if "/" in trained:  # a directory's name and a file: found beside DATA, or stop
                if not (DATA.parent / trained).is_file():  # (1k's stories are in 10k's files)
                    raise BabiError(
                        f"{summary} says the model was trained on {trained}, which is not "
                        f"under {DATA.parent}: pass --data with that directory"
                    )
                data = (DATA.parent / trained).parent
    if not list(Path(data).glob(f"qa{task}_*_train.txt")) and Path(data) != DATA:
        print(f"qa{task}: no file in {data}: scoring on {DATA}", file=sys.stderr)
        return DATA
    return data


def task_events(task: int, stories: list[Story]) -> tuple[list[dict], dict[str, str]]:
    """(events in order, expected answer by query id); story i is memory "qa{task}-{i}"."""
    out: list[dict] = []
    expected: dict[str, str] = {}
    for i, story in enumerate(stories):
        prefix = f"qa{task}-{i}-"
        out += events(story, f"qa{task}-{i}", prefix)
        expected.update({f"{prefix}{n}": q.answer for n, q in enumerate(story.questions)})
    return out, expected


def in_process(model: Path, batch: list[dict]) -> Answers:
    engine = Engine(load_model(model))
    memories: dict[str, Memory] = {}
    items, ids, answers = [], [], {}
    for e in batch:
        if e["memory"] not in memories:
            memories[e["memory"]] = engine.new_memory()
        memory = memories[e["memory"]]
        try:
            event = engine.write(e["text"]) if e["op"] == "write" else engine.query(x=e["text"])
        except InvalidInput:
            if e["op"] == "query":
                answers[e["id"]] = None
            continue
        items.append((memory, event))
        ids.append(e.get("id"))
    for query_id, result in zip(ids, engine.process(items), strict=True):
        if query_id is not None:
            answers[query_id] = result.extra.get("answer") if isinstance(result, Answer) else None
    return answers


def streamed(url: str, workdir: Path, model: Path, batch: list[dict], workers: int) -> Answers:
    prefix = f"memnet-babi-{uuid.uuid4().hex[:8]}"
    queries = {e["id"] for e in batch if e["op"] == "query"}
    with local_workers(url, model, prefix, workdir, count=workers) as client:
        send(client, batch)
        responses, _ = collect(client, queries, timeout_s=120)
    missing = queries - set(responses)
    if missing:
        raise SystemExit(f"memnet eval-babi: {len(missing)} queries got no response in 120 s")
    return {i: r.get("answer") for i, r in responses.items()}


def model_for(model: Path | None, task: int) -> Path:
    if model is None:
        return MODELS / f"qa{task}.safetensors"
    return model / f"qa{task}.safetensors" if model.is_dir() else model


def accuracy(answers: Answers, expected: dict[str, str]) -> float:
    return sum(answers.get(i) == a for i, a in expected.items()) / len(expected)


def run_eval(
    model: Path | None,
    data: Path | None,
    tasks: list[int],
    mode: str = "stream",
    which: str = "holdout",
    workers: int = 2,
    as_json: bool = False,
) -> int:
    models = {task: model_for(model, task) for task in tasks}
    missing = [str(path) for path in models.values() if not path.is_file()]
    if missing:
        raise BabiError(
            f"no model file {missing[0]}: pass --model FILE (or DIR of qaN.safetensors)"
        )
    if data is not None and not Path(data).is_dir():
        raise BabiError(f"no bAbI data at {data}: pass --data DIR (of qaN_*_train.txt files)")
    scores: dict[str, float] = {}
    disagree = 0
    print(f"{'task':<28} {'questions':>9} {'accuracy':>9}" + ("  agree" if mode == "both" else ""))
    with (
        tempfile.TemporaryDirectory(prefix="memnet-babi-") as tmp,
        local_redis(Path(tmp)) as (url, _),
    ):
        for task in tasks:
            path = models[task]
            batch, expected = task_events(task, stories_of(data_for(data, task, path), task, which))
            if mode == "in-process":
                answers = in_process(path, batch)
            else:
                answers = streamed(url, Path(tmp), path, batch, workers)
            note = ""
            if mode == "both":
                local = in_process(path, batch)
                differ = sum(local.get(i) != answers.get(i) for i in expected)
                disagree += differ
                note = "  yes" if not differ else f"  NO ({differ} answers differ)"
            scores[f"qa{task}"] = accuracy(answers, expected)
            label = f"qa{task} {NAMES[task]}"
            print(f"{label:<28} {len(expected):>9} {scores[f'qa{task}']:>9.1%}{note}", flush=True)
    mean = sum(scores.values()) / len(scores)
    failed = sum(s < 0.95 for s in scores.values())
    print(f"{'mean':<28} {'':>9} {mean:>9.1%}   ({failed} tasks below 95%)")
    if as_json:
        print(json.dumps(scores))
    return 1 if disagree else 0


def parse_tasks(value: str) -> list[int]:
    tasks = [int(t) for t in value.split(",") if t.strip()]
    bad = [t for t in tasks if not 1 <= t <= 20]
    if bad or not tasks:
        raise ValueError(f"tasks must be numbers from 1 to 20, got {value!r}")
    return tasks
