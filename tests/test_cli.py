"""The `bayes-llm` command line: options checked before anything loads, chat's multi-line prompts, the
shipped few-shot examples."""

from __future__ import annotations

import io
import time

import pytest

from bayes_llm import commands
from bayes_llm.cli import build_parser, main
from bayes_llm.dispatch.fewshot import read_examples
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "x", "--top-k", "0"], "--top-k: 0: must be at least 1"),
        (["generate", "--prompt", "x", "--strategy", "nope"], "use prompt | cls | fewshot | base | expert:<domain>"),
        (["chat", "--max-new-tokens", "-3"], "--max-new-tokens: -3: must be at least 1"),
        (["chat", "--strategy", "fewshot"], "fewshot needs --examples: use `bayes-llm generate --strategy fewshot`"),
        (["serve", "--bundle", "b", "--port", "99999"], "--port: 99999: a port is 0-65535"),
        # bytes that are not UTF-8 in argv reach Python as lone surrogates
        (["generate", "--prompt", "What is \udcff 2?"], "--prompt: the prompt is not UTF-8 text (character 9)"),
    ],
)
def test_bad_options_are_refused_before_loading(argv, message, capsys):
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert time.monotonic() - started < 5


def test_fewshot_needs_an_examples_file_that_exists(workdir, capsys):
    (workdir / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert main(["generate", "--prompt", "x", "--strategy", "fewshot"]) == 1
    assert main(["generate", "--prompt", "x", "--examples", "missing.jsonl"]) == 1
    (workdir / "shots.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    assert main(["generate", "--prompt", "x", "--examples", "shots.jsonl"]) == 1  # not silently ignored
    err = capsys.readouterr().err
    assert "needs --examples FILE.jsonl" in err and "missing.jsonl: no such file" in err
    assert "--examples is for --strategy fewshot" in err


def test_chat_reads_a_prompt_over_several_lines(monkeypatch):
    lines = iter(["Which is largest?\\", "A) 12\\", "B) 7", "", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert commands._read_prompt() == "Which is largest?\nA) 12\nB) 7"
    assert commands._read_prompt() == ""  # an empty line quits


def test_a_chat_line_that_is_not_text_is_refused_and_the_chat_goes_on(monkeypatch, capsys):
    answered = []

    class Engine:
        def refuse_overlong(self, prompts, max_new_tokens):
            pass

        def generate(self, prompts, **_):
            answered.extend(prompts)
            return [type("Answer", (), {"text": "4", "posterior": {}, "blend": {}})()]

    options = {"strategy": "cls", "mode": "max", "max_new_tokens": 8}
    monkeypatch.setattr(commands, "_engine_and_options", lambda args: (Engine(), options, None))
    typed = b"What is \xff 2?\nWhat is 2 + 2?\n\n"  # a strict UTF-8 stdin, as in an en_US.UTF-8 locale
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8", errors="strict"))
    assert main(["chat"]) == 0
    assert answered == ["What is 2 + 2?"] and "not UTF-8 text (character 9)" in capsys.readouterr().err


def test_chat_help_says_how_to_quit_and_continue(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "an empty line or Ctrl-D quits" in text and "end a line with \\ to go on" in text


def test_the_shipped_examples_are_valid_few_shot_rows():
    rows = read_examples(ROOT / "examples" / "shots.jsonl")
    assert len(rows) == 8 and all(row["answer"] in "AB" and len(row["choices"]) == 2 for row in rows)
