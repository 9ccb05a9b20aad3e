"""Training: the bAbI reader, the objective, and that a trained model serves what it learned."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from memnet import Engine, load_model
from memnet.babi import BabiError, events, read_stories, split, task_file
from memnet.model import Components
from memnet.training.examples import build
from memnet.training.fit import fit, forward, init_params
from memnet.training.settings import Settings
from memnet.training.train import task_config
from tests.babi import DATA, train_small

STORY = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Mary went back to the garden.
5 Where is Mary? \tgarden\t4
1 Sandra travelled to the office.
2 Where is Sandra? \toffice\t1
"""


def test_reader_splits_stories_and_maps_supporting_facts(tmp_path):
    path = tmp_path / "qa1_x_train.txt"
    path.write_text(STORY)
    assert task_file(tmp_path, 1) == path
    stories = read_stories(path)
    assert [len(s.statements) for s in stories] == [3, 1]
    q = stories[0].questions[1]
    assert (q.text, q.answer, q.support, q.after) == ("Where is Mary?", "garden", (2,), 3)
    ops = [e["op"] for e in events(stories[0], "m", "q")]
    assert ops == ["write", "write", "query", "write", "query"]
    train, val, held = split(read_stories(task_file(DATA, 1)))
    assert (len(train), len(val), len(held)) == (150, 30, 20)  # in the file's order
    assert split(stories[:1]) == ([stories[0]], [], [])
    assert [len(part) for part in split(stories * 2)] == [2, 1, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x Mary\n", "expected 'ID text'"),
        ("1 Where? \tx\t7\n", "supporting fact IDs .7. name no statement"),
        ("1 Where? \tx\n", "a question needs"),
        ("\u00b2 Mary went home.\n", "expected 'ID text'"),  # isdigit, but not a number
        ("1 Where? \t\t1\n", "a question without an answer"),
        ("1 Mary went home.\n2 Where? \thome\t\u0661\n", "supporting fact IDs"),  # Arabic 1
    ],
)
def test_malformed_files_are_refused_with_the_line(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(BabiError, match=f"bad.txt:[12]: {message}"):
        read_stories(path)


def test_line_ends_are_newlines_only(tmp_path):
    """U+2028 and the like inside a statement are text (str.splitlines would cut there), a
    byte-order mark and CRLF line ends are not."""
    path = tmp_path / "qa1_x_train.txt"
    path.write_text("\ufeff1 Mary went\u2028 home.\r\n2 Where is Mary?\thome\t1\r\n")
    [story] = read_stories(path)
    assert story.statements == ["Mary went\u2028 home."]
    assert (story.questions[0].answer, story.questions[0].support) == ("home", (0,))


def small_task(stories, dim=16):
    train, val, _ = split(stories)
    config = task_config(stories, train, dim, 3, "multi-hop", "answer")
    parts = Components.build(config)
    shape = (config.slots, config.input_dim, 3)
    answers = config.options["answers"]
    ex = [build(s, parts.encoder.vocabulary, answers, *shape) for s in (train, val)]
    return config, parts, ex


def test_training_steps_decrease_the_loss_on_a_tiny_set():
    stories = read_stories(task_file(DATA, 1))[:30]
    _, parts, (train, val) = small_task(stories)
    params = init_params(parts.param_specs(), 0, 0.1)
    settings = Settings(epochs=12, patience=100, batch=8)
    trio = (parts.encoder, parts.output, parts.response)
    _, history = fit(trio, params, train, val, settings, seed=0)
    assert len(history.train_loss) == 12
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    # without the supporting facts the objective is the answer's cross-entropy alone
    _, plain = fit(trio, params, train, val, Settings(epochs=2, supervise_support=False), 0)
    assert plain.train_loss[0] < history.train_loss[0]


@pytest.fixture(scope="module", params=["answer", "answer-mlp", "relative-time", "latest"])
def trained(request, babi_model, tmp_path_factory):
    if request.param == "answer":
        return babi_model
    if request.param == "latest":  # O's latest-before hops, their bias and gate learned
        path = train_small(tmp_path_factory.mktemp("lt"), epochs=30, relative=True, latest=True)
        params = load_model(path).params
        assert np.abs(params["latest_gate"][1:]).max() > 1e-3
        assert np.abs(params["latest_bias"][1:]).max() > 1e-3
        return path
    if request.param == "relative-time":  # O's relative time term, learned (not zero)
        path = train_small(tmp_path_factory.mktemp("rt"), epochs=30, relative=True)
        assert np.abs(load_model(path).params["time_rel"][1:]).max() > 1e-3
        return path
    return train_small(tmp_path_factory.mktemp("mlp"), epochs=30, response=request.param)


def test_serving_computes_what_training_computed(trained):
    """The dense training forward pass and the engine give the same logits, and qa1's are
    right on stories neither training nor the choice of epoch saw."""
    model = load_model(trained)
    stories = read_stories(task_file(DATA, 1))
    *_, val = split(stories)  # the held-out stories: no choice in training saw them
    parts = model.components
    ex = build(val, parts.encoder.vocabulary, model.config.options["answers"],
               model.config.slots, model.config.input_dim, 3)  # fmt: skip
    run = forward(parts.encoder, parts.output, parts.response)
    logits, _ = run({k: jnp.asarray(v) for k, v in model.params.items()}, ex)
    engine = Engine(model)
    served = []
    for i, story in enumerate(val):
        memory = engine.new_memory()
        items = [
            (memory, engine.write(e["text"]) if e["op"] == "write" else engine.query(x=e["text"]))
            for e in events(story, "m", "q")
        ]
        served += [r.y for r in engine.process(items) if r is not None]
        assert i < 20
    served = np.stack(served)
    np.testing.assert_allclose(served, np.asarray(logits), rtol=1e-4, atol=1e-4)
    accuracy = float((served.argmax(1) == ex.answer).mean())
    assert accuracy >= 0.95  # qa1 is learned in seconds


def test_relative_time_scores_ages_relative_to_the_hop_before():
    """The relative term by hand: hop 2's scores gain sum_j a1_j T[age_k - age_j]; a table
    that favours "one write older than what hop 1 found" moves hop 2 there."""
    stories = read_stories(task_file(DATA, 1))[:10]
    train, _, _ = split(stories)
    config = task_config(stories, train, 4, 2, "multi-hop", "answer", relative_time=True)
    out = Components.build(config).output
    s = config.slots
    p = {k: jnp.zeros(v.shape) for k, v in out.params().items()}
    p["hop_h"] = jnp.eye(4)
    cand = np.zeros((1, s, 8), np.float32)
    cand[0, 2, :4] = 5.0  # hop 1 finds slot 2 (its key matches the query)
    age = np.arange(s, dtype=np.int32)[None]  # slot k written k writes ago
    v = np.zeros((1, 8), np.float32)
    v[0, :4] = 1.0
    mask = np.ones((1, s), bool)
    table = np.zeros((2, 2 * s - 1), np.float32)
    table[1, s - 1 + 1] = 30.0  # hop 2: one write older than hop 1's slot
    p["time_rel"] = jnp.asarray(table)
    _, attention = out.hop_attention(p, v, cand, mask, age)
    assert int(attention[0, 0].argmax()) == 2 and int(attention[1, 0].argmax()) == 3
    p["time_rel"] = jnp.zeros_like(p["time_rel"])
    _, plain = out.hop_attention(p, v, cand, mask, age)
    assert int(plain[1, 0].argmax()) == 2


def _latest_by_hand(m, mask, age, before, g):
    """multi-hop's latest read as its definition says, slot by slot: slot k takes m_k times
    the chance that no slot written between an anchor and k matched, the anchor being each
    slot j newer than k at the hop before's weight on it (share g) or the present (1 - g).
    Slots are ordered by age, equal ages by position (the later position is newer)."""
    w = np.zeros_like(m)
    for b in range(m.shape[0]):
        used = np.flatnonzero(mask[b])
        when = {i: (-int(age[b, i]), i) for i in used}  # larger: newer

        for k in used:

            def none_between(anchor, k=k, b=b, used=used, when=when):
                between = [i for i in used if when[k] < when[i] < anchor]
                return np.prod([1 - m[b, i] for i in between])

            anchored = sum(before[b, j] * none_between(when[j]) for j in used if when[j] > when[k])
            w[b, k] = m[b, k] * (g * anchored + (1 - g) * none_between((1, 0)))
    return w


def test_latest_reads_the_latest_matching_fact_before_the_anchor():
    """The latest option's hop: against its definition computed slot by slot (random scores,
    random ages with ties, empty slots), and on a story's shape: of the facts that match, the one
    just before the hop before's fact, not an older match nor a newer one; with the gate on
    the present, the newest match."""
    from memnet.components.multi_hop import MultiHop

    rng = np.random.default_rng(3)
    b, k = 3, 9
    score = rng.normal(0, 2, (b, k)).astype(np.float32)
    mask = rng.random((b, k)) < 0.8
    age = rng.integers(0, 5, (b, k)).astype(np.int32)  # ties too, as training's age noise
    before = rng.random((b, k)).astype(np.float32) * mask
    before /= before.sum(1, keepdims=True)
    p = {"latest_bias": jnp.asarray([0.0, 0.5]), "latest_gate": jnp.asarray([0.0, 1.0])}
    got = np.asarray(MultiHop._latest(p, 1, score, mask, age, before))
    m = 1 / (1 + np.exp(-(score.astype(np.float64) + 0.5)))
    want = _latest_by_hand(m, mask, age, before, 1 / (1 + np.exp(-1.0)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[~mask] == 0).all() and (got.sum(1) <= 1 + 1e-6).all()
    # two slots of one age, both matching: one weight between them, the later position's
    tied = np.asarray([[20.0, 20.0, -20.0]], np.float32)
    for gate in (-30.0, 0.0, 30.0):
        p = {"latest_bias": jnp.zeros(2), "latest_gate": jnp.asarray([0.0, gate])}
        w = np.asarray(MultiHop._latest(p, 1, tied, np.ones((1, 3), bool), np.asarray([[5, 5, 0]]),
                                        np.asarray([[0.0, 0.0, 1.0]], np.float32)))  # fmt: skip
        assert w.sum() <= 1 + 1e-6 and w[0, 1] > 0.99, w
    # slots 0..7, slot k written k writes ago; slots 1, 3, 6 and 7 match (score 20)
    s = 8
    score = np.full((1, s), -20.0, np.float32)
    score[0, [1, 3, 6, 7]] = 20.0
    age, mask = np.arange(s, dtype=np.int32)[None], np.ones((1, s), bool)
    anchor = np.zeros((1, s), np.float32)
    anchor[0, 4] = 1.0  # the hop before found slot 4: the match just before it is 6
    for gate, want in ((30.0, 6), (-30.0, 1)):  # from the anchor; from the present
        p = {"latest_bias": jnp.zeros(2), "latest_gate": jnp.asarray([0.0, gate])}
        w = np.asarray(MultiHop._latest(p, 1, score, mask, age, anchor))[0]
        assert int(w.argmax()) == want and w[want] > 0.99, w
    # norms that checked inputs can reach: scores far beyond float32's exp give no NaN
    score = np.asarray([[3e38, -3e38, 3e38, 2.0, -np.float32(1e30), 1e30]], np.float32)
    p = {"latest_bias": jnp.zeros(2), "latest_gate": jnp.zeros(2)}
    w = np.asarray(MultiHop._latest(p, 1, score, np.ones((1, 6), bool), np.arange(6)[None],
                                    np.full((1, 6), 1 / 6, np.float32)))  # fmt: skip
    assert np.isfinite(w).all() and w.sum() <= 1 + 1e-6 and abs(w[0, 0] - 0.5) < 1e-6, w


def test_memnet_train_latest_writes_a_model_that_reads_the_latest(tmp_path):
    """`memnet train --latest` trains and writes a model whose O has the option (and its
    learned parameters), which the engine serves."""
    from worker.cli import main

    out = tmp_path / "qa1.safetensors"
    argv = ["train", "--task", "1", "--data", str(DATA), "--out", str(out), "--seeds", "1",
            "--epochs", "2", "--dim", "8", "--latest"]  # fmt: skip
    assert main(argv) == 0
    model = load_model(out)
    assert model.config.options["latest"] is True and "latest_gate" in model.params
    engine = Engine(model)
    memory = engine.new_memory()
    results = engine.process(
        [
            (memory, engine.write("Mary went to the kitchen.")),
            (memory, engine.query(x="Where is Mary?")),
        ]
    )
    assert np.isfinite(results[1].y).all()


def test_a_bad_relative_time_option_is_refused():
    from memnet.model import ModelFileError

    stories = read_stories(task_file(DATA, 1))[:10]
    config = task_config(stories, stories, 4, 2, "multi-hop", "answer", relative_time=True)
    bad = dataclasses.replace(config, options={**config.options, "relative_time": "yes"})
    with pytest.raises(ModelFileError, match=r"output 'multi-hop': .*'relative_time' must be true"):
        Components.build(bad)
    bad = dataclasses.replace(config, options={**config.options, "latest": 1})
    with pytest.raises(ModelFileError, match=r"output 'multi-hop': .*'latest' must be true"):
        Components.build(bad)
    # a G whose slots all have age 0 leaves latest nothing to order by
    bad = dataclasses.replace(
        config, generalizer="gated-nearest", options={**config.options, "latest": True}
    )
    with pytest.raises(ModelFileError, match=r"'latest' needs a G that records .*'gated-nearest'"):
        Components.build(bad)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], (200, 40, 25)),
        (["--tenk"], (100, 20, 25)),
        (["--tenk", "--patience", "40", "--epochs", "300"], (300, 40, 25)),
        (["--tenk", "--joint", "--decay-every", "3"], (100, 20, 3)),
    ],
)
def test_train_babi_keeps_explicit_settings_under_tenk(monkeypatch, tmp_path, argv, expected):
    from scripts import train_babi

    monkeypatch.setattr("sys.argv", ["train_babi.py", "--out", str(tmp_path), *argv])
    args = train_babi.parse_args()
    assert (args.epochs, args.patience, args.decay_every) == expected


@pytest.mark.parametrize("tenk", [False, True])
def test_train_babi_passes_dim_and_weight_decay_to_training(monkeypatch, tmp_path, tenk):
    """--dim and --weight-decay reach train_task, also for a task --tenk trains on 1k (no
    10k file: its own settings)."""
    from scripts import train_babi

    seen = {}

    def fake(data, task, out, **kwargs):
        seen.update(kwargs)
        return {"val_accuracy": 1.0, "seed_accuracies": [1.0], "holdout_accuracy": 1.0,
                "seed_holdout_accuracies": [1.0], "seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(train_babi, "train_task", fake)
    argv = ["--tasks", "1", "--dim", "20", "--weight-decay", "0.3", "--out", str(tmp_path)]
    if tenk:
        argv += ["--tenk", "--data-10k", str(tmp_path / "no-10k")]
    monkeypatch.setattr("sys.argv", ["train_babi.py", *argv])
    assert train_babi.main() == 0
    assert seen["dim"] == 20 and seen["settings"].weight_decay == 0.3


def test_age_noise_follows_writes_only_never_empty_slots():
    """Every write followed by a dummy (share 1): a memory of n statements in 6 slots gets
    ages 2(n-1) .. 2, 0: the empty slots, never written, add nothing to anyone's age."""
    from memnet.training.examples import Examples
    from memnet.training.fit import noisy_ages

    rows, slots = 3, 6
    age = np.zeros((rows, slots), np.int32)
    filled = np.zeros((rows, slots), bool)
    for n in range(1, rows + 1):  # row n-1 holds n statements, oldest first
        age[n - 1, :n] = np.arange(n - 1, -1, -1)
        filled[n - 1, :n] = True
    z = np.zeros((rows, 1), np.int32)
    batch = Examples(np.zeros((rows, slots, 1), np.int32), filled, age, z, z[:, 0], z)
    noisy = noisy_ages(batch, 1.0, np.random.default_rng(0))
    assert noisy.tolist() == [[0] * 6, [2, 0, 0, 0, 0, 0], [4, 2, 0, 0, 0, 0]]


def test_validation_loss_counts_each_example_once():
    """The last, padded batch: its copies of the first examples are marked unknown, so the
    mean is over the real examples (33 here: the 33rd alone in the second batch)."""
    from memnet.training.examples import Examples
    from memnet.training.fit import _score

    n = 33
    loss = np.zeros(n)
    loss[32] = 100.0

    def evaluate(p, b):  # as loss_fn: the mean over the known answers
        known = b.answer >= 0
        return loss[b.answer[known]].mean(), known

    z = np.zeros((n, 1), np.int32)
    data = Examples(np.zeros((n, 1, 1), np.int32), z.astype(bool), z, z, np.arange(n), z)
    mean, accuracy = _score(evaluate, None, data, 32)
    assert mean == pytest.approx(100.0 / n) and accuracy == 1.0


@pytest.mark.parametrize(
    ("output", "response", "options"),
    [
        ("topk-attention", "answer", {"vocabulary", "answers"}),
        ("multi-hop", "mlp", {"vocabulary", "hops"}),
    ],
)
def test_a_task_config_writes_the_options_its_components_read(output, response, options):
    """(It wrote "hops" and "answers" whatever the O and R: options nothing used.)"""
    from memnet.model import random_model

    stories = read_stories(task_file(DATA, 1))[:10]
    train, _, _ = split(stories)
    config = task_config(stories, train, 4, 2, output, response, relative_time=False)
    assert set(random_model(config).config.options) == options


def test_memnet_train_weight_decay_shrinks_the_weights(tmp_path):
    """`memnet train --weight-decay` reaches AdamW: the same seed and epochs with a large decay
    end with smaller weights, and the summary records it; a negative decay is refused."""
    from worker.cli import main

    norms = {}
    for decay in ("0", "5"):
        out = tmp_path / f"qa1-{decay}.safetensors"
        argv = ["train", "--task", "1", "--data", str(DATA), "--out", str(out), "--seeds", "1",
                "--epochs", "2", "--dim", "8", "--weight-decay", decay]  # fmt: skip
        assert main(argv) == 0
        params = load_model(out).params
        norms[decay] = float(np.linalg.norm(params["embed_key"]))
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["settings"]["weight_decay"] == float(decay)
    assert norms["5"] < 0.8 * norms["0"]
    for bad in ("-0.1", "nan", "inf", "x"):
        with pytest.raises(SystemExit) as e:
            main(["train", "--task", "1", "--weight-decay", bad])
        assert e.value.code == 2
