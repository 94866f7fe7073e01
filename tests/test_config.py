from __future__ import annotations

import pytest
import yaml

from bayes_llm.cli import main
from bayes_llm.config import ParamsError, load_params, parse_params
from tests.conftest import ROOT, raw_params


def test_project_params_are_valid_and_smoke_overlays_sizes():
    full = load_params(ROOT / "params.yaml")
    smoke = parse_params(raw_params())
    assert full.profile == "full" and smoke.profile == "smoke"
    assert full.data.domains.math.sizes.train > smoke.data.domains.math.sizes.train
    # The overlay touches only what it names.
    assert smoke.data.domains.math.max_value == full.data.domains.math.max_value
    assert smoke.data.seed == full.data.seed


@pytest.mark.parametrize(
    ("mutate", "path", "expected"),
    [
        (lambda r: r["data"]["domains"]["math"].update(max_valu=5), "data.domains.math.max_valu", "unknown key"),
        (
            lambda r: r["data"]["domains"]["math"]["sizes"].update(train="many"),
            "data.domains.math.sizes.train",
            "valid integer",
        ),
        (
            lambda r: r["data"]["domains"]["code"]["sizes"].update(test=0),
            "data.domains.code.sizes.test",
            "greater than 0",
        ),
        (lambda r: r["data"]["domains"]["math"].update(ops=["/"]), "data.domains.math.ops.0", "'+', '-' or '*'"),
        (
            lambda r: r["data"]["domains"]["math"].update(operands={"min": 4, "max": 2}),
            "data.domains.math.operands",
            "min (4) must be <= max (2)",
        ),
        (lambda r: r.update(profile="huge"), "profile", "'full', 'smoke' or 'real'"),
        (
            lambda r: r["data"].update(sources={"qa": {"type": "local", "answer_kind": "letter"}}),
            "data.sources.qa.local.files",
            "Field required",
        ),
    ],
)
def test_bad_params_name_the_key_and_what_was_expected(mutate, path, expected):
    raw = raw_params(profile="full")
    mutate(raw)
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    message = str(caught.value)
    line = next((line for line in message.splitlines() if line.strip().startswith(path + ":")), None)
    assert line is not None, message
    assert expected in line


def test_smoke_overlay_is_validated_too():
    raw = raw_params(profile="full")
    raw["profile"] = "smoke"
    raw["smoke"]["data"]["domains"]["math"]["sizes"]["train"] = -1
    with pytest.raises(ParamsError, match=r"data\.domains\.math\.sizes\.train"):
        parse_params(raw)


def test_cli_reports_bad_params_and_exits_2(tmp_path, capsys):
    raw = raw_params()
    raw["data"]["seed"] = "abc"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(path), "params"]) == 2
    err = capsys.readouterr().err
    assert "data.seed" in err and "Traceback" not in err


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)
