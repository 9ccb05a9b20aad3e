"""Model files: round trip, `memnet init`, and refusals that name what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from memnet import ModelConfig, ModelFileError, load_model, random_model, save_model
from tests.conftest import REFERENCE_SIZES, make_model
from worker.cli import main as cli


def test_random_model_follows_the_reference_initialisation():
    model = make_model(0, input_dim=64, memory_dim=64, slots=2000)
    p = model.params
    assert set(p) == {
        "input_mlp_w1",
        "input_mlp_b1",
        "input_mlp_w2",
        "input_mlp_b2",
        "gate_w",
        "gate_b",
        "response_mlp_w1",
        "response_mlp_b1",
        "response_mlp_w2",
        "response_mlp_b2",
        "memory_init",
    }
    assert p["gate_w"].shape == (128, 1) and p["memory_init"].shape == (2000, 64)
    for name in ("input_mlp_b1", "input_mlp_b2", "gate_b", "response_mlp_b1", "response_mlp_b2"):
        assert not p[name].any()
    for name in ("input_mlp_w1", "memory_init"):
        assert abs(p[name].mean()) < 0.05 and abs(p[name].std() - 1) < 0.05
    assert all(a.dtype == np.float32 for a in p.values())


def test_round_trip_is_exact_and_fingerprint_is_stable(tmp_path):
    model = make_model(7)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    assert all(np.array_equal(loaded.params[k], model.params[k]) for k in model.params)
    assert loaded.fingerprint == model.fingerprint
    assert make_model(8).fingerprint != model.fingerprint


def test_memnet_init_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert (
        cli(
            [
                "init",
                str(out),
                "--input-dim",
                "5",
                "--memory-dim",
                "10",
                "--output-dim",
                "5",
                "--slots",
                "10",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    model = load_model(out)
    assert model.config == ModelConfig(**REFERENCE_SIZES)
    assert model.fingerprint == random_model(model.config, seed=3).fingerprint
    assert cli(["inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["config"]["slots"] == 10


def test_memnet_init_refuses_bad_sizes(tmp_path, capsys):
    assert (
        cli(
            [
                "init",
                str(tmp_path / "m"),
                "--input-dim",
                "0",
                "--memory-dim",
                "10",
                "--output-dim",
                "5",
                "--slots",
                "10",
            ]
        )
        == 2
    )
    assert "'input_dim' must be a positive integer, got 0" in capsys.readouterr().err


def write_raw(path, params, config):
    meta = (
        {}
        if config is None
        else {"config": config if isinstance(config, str) else json.dumps(config)}
    )
    save_file(params, str(path), metadata=meta)


def tampered(**changes):
    model = make_model(0)
    params = {k: np.array(v) for k, v in model.params.items()}
    config = model.config.to_json()
    for key, value in changes.items():
        if key == "config":
            config = value(config)
        else:
            value(params)
    return params, config


def _nan(p):
    p["gate_w"][3, 0] = np.nan


@pytest.mark.parametrize(
    "params, config, message",
    [
        (
            *tampered(shape=lambda p: p.update(gate_w=np.zeros((7, 1), np.float32))),
            "tensor 'gate_w' has shape (7, 1), expected (20, 1)",
        ),
        (
            *tampered(missing=lambda p: p.pop("response_mlp_b2")),
            "missing tensors ['response_mlp_b2']",
        ),
        (*tampered(nan=_nan), "tensor 'gate_w' has 1 NaN or infinite values"),
        (  # finite, but its squared norm is not: searches would take the slot for empty
            *tampered(huge=lambda p: p["memory_init"].__setitem__((3, 0), 1.9e19)),
            "tensor 'memory_init': row 3's squared norm is beyond float32's range",
        ),
        (
            *tampered(dtype=lambda p: p.update(gate_b=np.zeros(1, np.float64))),
            "tensors must be float32 (F32); found 'gate_b' F64",
        ),
        (
            *tampered(extra=lambda p: p.update(bonus=np.zeros(1, np.float32))),
            "unexpected tensors ['bonus']",
        ),
        (
            *tampered(config=lambda c: {**c, "generalizer": "telepathy"}),
            "unknown generalizer 'telepathy' in model config (known: append-only, gated-nearest)",
        ),
        (*tampered(config=lambda c: {**c, "slots": -1}), "'slots' must be a positive integer"),
        (*tampered(config=lambda c: {**c, "colour": "red"}), "unknown keys ['colour']"),
        (*tampered(config=lambda c: {**c, "version": 9}), "'version' 9 is not supported"),
        (
            *tampered(config=lambda c: {k: v for k, v in c.items() if k != "top_k"}),
            "missing ['top_k']",
        ),
        (*tampered(config=lambda c: "{not json"), "'config' is not valid JSON"),
        (*tampered(config=lambda c: {**c, "options": {"hops": 2, "x": 1}}), "options ['x']"),
        (*tampered(config=lambda c: "[" * 100_000), "'config' is not valid JSON"),
        (*tampered(config=lambda c: "9" * 5000), "'config' is not valid JSON"),
        (
            *tampered(config=lambda c: {**c, "options": {"hopz": 7}}),
            "model config options ['hopz'] are not read by any component (its components "
            "read: none)",
        ),
        (*tampered(config=lambda c: None), "metadata has no 'config' entry"),
    ],
)
def test_bad_model_files_are_refused_naming_the_problem(tmp_path, params, config, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, params, config)
    with pytest.raises(ModelFileError) as e:
        load_model(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_tensor_type_numpy_lacks_is_refused_by_its_name(tmp_path):
    """F8_E4M3 (numpy has no such type): refused from the file's header, not a traceback."""
    model = make_model(0)
    header, data = {"__metadata__": {"config": model.config.canonical()}}, b""
    for name, array in sorted(model.params.items()):
        raw = array.tobytes() if name != "gate_b" else bytes(array.size)
        dtype = "F32" if name != "gate_b" else "F8_E4M3"
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}  # fmt: skip
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "f8.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    with pytest.raises(ModelFileError, match="found 'gate_b' F8_E4M3"):
        load_model(path)


def test_not_a_model_file(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(tmp_path / "junk")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "absent")


def test_an_option_of_another_component_is_left_alone(tmp_path):
    """(What training wrote before 2026-12-06: "hops" in a topk-attention model.)"""
    model = make_model(0)
    path = tmp_path / "m.safetensors"
    write_raw(path, dict(model.params), {**model.config.to_json(), "options": {"hops": 2}})
    assert load_model(path).config.options == {"hops": 2}
