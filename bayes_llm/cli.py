"""The `bayes-llm` command. Stages call it too, so a stage and its CLI command are one code path."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from bayes_llm.config import PARAMS_FILE, load_params
from bayes_llm.errors import UserError

DESCRIPTION = """\
bayes-llm: self-adaptive hybrid Mamba/attention LLMs (Transformer²-style SVF experts chosen by a
Bayesian dispatcher), run as a reproducible DVC pipeline.

Most work runs through DVC (`dvc repro`); these commands are what its stages call, plus tools.
Params come from params.yaml; `profile: smoke` there (or `dvc exp run -S profile=smoke`) selects
the tiny end-to-end configuration."""


def _params_command(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    print(yaml.safe_dump(params.model_dump(mode="json", exclude={"smoke"}), sort_keys=False), end="")
    return 0


def _prepare_command(args: argparse.Namespace) -> int:
    from bayes_llm.data.prepare import format_summary, prepare

    params = load_params(args.params)
    summary = prepare(params, progress=not args.quiet)
    print(format_summary(summary))
    return 0


def _base_command(args: argparse.Namespace) -> int:
    from bayes_llm.model.base import build_base

    params = load_params(args.params)
    metrics = build_base(params, progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("parameters", "train_seconds", "final_val_loss", "val_accuracy")}))
    return 0


def _decompose_command(args: argparse.Namespace) -> int:
    from bayes_llm.model.base import BASE_DIR
    from bayes_llm.svf.decompose import decompose_base

    params = load_params(args.params)
    report = decompose_base(params.svf.targets, BASE_DIR, progress=not args.quiet)
    print(json.dumps({k: report[k] for k in ("matrices", "singular_values", "seconds", "max_relative_error")}))
    return 0


def _train_expert_command(args: argparse.Namespace) -> int:
    from bayes_llm.experts.stage import build_expert

    params = load_params(args.params)
    report = build_expert(params, args.domain, progress=not args.quiet)
    summary = {k: report[k] for k in ("domain", "objective", "test_accuracy", "gain", "train_seconds")}
    print(json.dumps(summary))
    return 0


def _compare_objectives_command(args: argparse.Namespace) -> int:
    from bayes_llm.objective_study import compare_objectives

    report = compare_objectives(load_params(args.params), args.domain, args.rl_steps, progress=not args.quiet)
    print(json.dumps({run["variant"]: run["gain"]["gain_points"] for run in report["runs"]}))
    return 0


def _calibrate_command(args: argparse.Namespace) -> int:
    from bayes_llm.dispatch.stage import calibrate

    params = load_params(args.params)
    report = calibrate(params, progress=not args.quiet)
    keys = ("strategy", "routing_accuracy", "ece_after")
    print(json.dumps({**{k: report[k] for k in keys}, "overhead": report["timing"]["overhead_share_of_pass2"]}))
    return 0


def _train_lora_command(args: argparse.Namespace) -> int:
    from bayes_llm.baselines.lora import build_lora

    report = build_lora(load_params(args.params), progress=not args.quiet)
    print(json.dumps({d: r["last_loss"] for d, r in report["domains"].items()} | {"seconds": report["stage_seconds"]}))
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    from bayes_llm.evaluate.report import results_table
    from bayes_llm.evaluate.stage import evaluate

    report = evaluate(load_params(args.params), progress=not args.quiet)
    print(results_table(report))
    return 0


def _bundle_command(args: argparse.Namespace) -> int:
    from bayes_llm.bundle import build_bundle

    print(build_bundle(load_params(args.params)))
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    from bayes_llm.bundle import verify

    manifest = verify(args.bundle, args.base)
    checked = "files and base" if args.base else "files (no --base given: the base was not checked)"
    print(f"{args.bundle}: {manifest['name']} {manifest['version']}: {len(manifest['files'])} {checked} OK")
    return 0


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


def _engine_and_options(args: argparse.Namespace):
    from bayes_llm.adapt.engine import Engine

    params = load_params(args.params)
    cfg = params.dispatch
    options = {
        "strategy": args.strategy or cfg.strategy,
        "mode": args.blending_mode or cfg.blending_mode,
        "top_k": args.top_k or cfg.top_k,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.bundle is None:
        return Engine(args.models), options, params
    return Engine(_bundle_models(args.bundle, args.models)), options, params


def _bundle_models(bundle: Path, models: Path) -> Path:
    """A models layout from the base and SVD of `models` and the experts and dispatcher of a bundle whose
    files match its manifest. The base is not fingerprinted here: the Engine refuses experts trained on
    another base than `models/svd`, and factors decomposed from another base than `models/base`."""
    import tempfile

    from bayes_llm.bundle import verify

    verify(bundle)
    layout = Path(tempfile.mkdtemp(prefix="bayes-llm-bundle-"))
    for name, source in (("base", models), ("svd", models), ("experts", bundle), ("dispatcher", bundle)):
        (layout / name).symlink_to((source / name).resolve(), target_is_directory=True)
    return layout


def _generate_command(args: argparse.Namespace) -> int:
    engine, options, params = _engine_and_options(args)
    if options["strategy"] == "fewshot":
        return _fewshot(engine, options, params, args)
    for answer in engine.generate(args.prompt, **options):
        _show_answer(answer, args.show_experts)
    return 0


def _fewshot(engine, options: dict, params, args: argparse.Namespace) -> int:
    from bayes_llm.dispatch.fewshot import read_examples

    if not args.examples:
        raise UserError("--strategy fewshot needs --examples FILE.jsonl (rows with prompt and answer)")
    cfg = params.dispatch.fewshot
    shots = read_examples(args.examples)[: cfg.shots]
    result, _ = engine.fewshot(shots, args.answer_kind, cfg.population, cfg.elites, cfg.iterations, params.seed,
                               cfg.per_layer, cfg.max_new_tokens)  # fmt: skip
    alpha = dict(zip(engine.domains, result.alpha.reshape(len(engine.domains), -1).mean(axis=1).round(3).tolist(),
                     strict=True))  # fmt: skip
    for text, prompt in zip(engine.complete(args.prompt, options["max_new_tokens"]), args.prompt, strict=True):
        print(text.strip())
        if args.show_experts:
            print(f"  [few-shot reward {result.reward:.3f} on {len(shots)} examples; alpha: {alpha}]  ({prompt[:40]})")
    return 0


def _chat_command(args: argparse.Namespace) -> int:
    engine, options, _ = _engine_and_options(args)
    print(f"bayes-llm chat: strategy {options['strategy']}, blending {options['mode']}; an empty line or Ctrl-D quits")
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        _show_answer(engine.generate([prompt], **options)[0], args.show_experts)
    return 0


def _add_adapt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="directory with base/ svd/ experts/ dispatcher/ (default: %(default)s)")  # fmt: skip
    parser.add_argument("--bundle", type=Path, help="take the experts and the dispatcher from this bundle "
                        "(verified against --models' base first) instead of --models")  # fmt: skip
    parser.add_argument("--strategy", help="first pass: prompt | cls | fewshot | base | expert:<domain> "
                        "(default: params dispatch.strategy)")  # fmt: skip
    parser.add_argument("--blending-mode", choices=["weighted_average", "top_k", "max"],
                        help="how the posterior mixes experts (default: params dispatch.blending_mode)")  # fmt: skip
    parser.add_argument("--top-k", type=int, help="experts kept by top_k blending (default: params dispatch.top_k)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--show-experts", action="store_true", help="print the posterior and the blend")


def _benchmark_command(args: argparse.Namespace) -> int:
    from bayes_llm.model.benchmark import benchmark

    params = load_params(args.params)
    results = benchmark(
        params.model,
        lengths=tuple(args.lengths),
        batch_size=args.batch_size,
        tokens_per_step=args.tokens_per_step,
        steps=args.steps,
        vocab=params.tokenizer.vocab_size,
        families=tuple(args.families),
    )
    print(json.dumps(results, indent=2))
    return 0


def _kernel_check_command(args: argparse.Namespace) -> int:
    from bayes_llm.model import kernel_check

    params = load_params(args.params)
    if args.step == "reference":
        print(kernel_check.reference(args.checkpoint, args.work, params.model, params.tokenizer.vocab_size, args.steps))
        return 0
    report = kernel_check.compare(args.checkpoint, args.work, params.model, params.tokenizer.vocab_size, args.steps)
    print(json.dumps(report, indent=2))
    return 0 if report["within_tolerance"] else 1


def _svf_benchmark_command(args: argparse.Namespace) -> int:
    from bayes_llm.svf.benchmark import benchmark

    params = load_params(args.params)
    results = benchmark(params, batch_size=args.batch_size, seq_len=args.seq_len, new_tokens=args.new_tokens,
                        repeats=args.repeats)  # fmt: skip
    print(json.dumps(results, indent=2))
    return 0


def _stage_command(commands, name: str, run, **texts: str) -> argparse.ArgumentParser:
    """A DVC stage's command: what the stage script calls (with its foreach key, if any)."""
    parser = commands.add_parser(name, **texts)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-llm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser(
        "params",
        help="validate params.yaml and print the resolved values",
        description="Validate the params file against the typed schema and print the "
        "resolved values (smoke overlay applied, defaults filled in). Exits 2 "
        "with the key path of every invalid value.",
    )
    show.set_defaults(run=_params_command)

    _stage_command(
        commands,
        "prepare",
        _prepare_command,
        help="build, validate and write the data (DVC stage `prepare`)",
        description="Generate or load every domain's train/val/test splits, write "
        "them to data/prepared/ as parquet, and gate them with Great Expectations. "
        "On failure nothing is left in data/prepared/; the report is in "
        "reports/data/validation.json.",
    )
    _stage_command(
        commands,
        "base",
        _base_command,
        help="pretrain or load the base model (DVC stage `base`)",
        description="model.source: scratch trains a byte-level BPE tokenizer and pretrains a MambaFormer "
        "(params model.*, pretrain.*) on every domain's train split; any other source loads that "
        "checkpoint (local dir or hub id). Either way the model goes to models/base/ and greedy "
        "val accuracy per domain to reports/base/metrics.json.",
    )

    _stage_command(
        commands,
        "decompose",
        _decompose_command,
        help="SVD of the base's target matrices (DVC stage `decompose`)",
        description="Thin fp32 SVD, layer by layer, of every matrix svf.targets selects in models/base/ "
        "(presets mlp | attn | mamba | all, or module-name regexes). Writes models/svd/ (safetensors "
        "U, S, Vh + svd.json with the base and SVD fingerprints) and reports/svf/decompose.json "
        "(matrices, seconds, max relative reconstruction error).",
    )

    train = _stage_command(
        commands,
        "train-expert",
        _train_expert_command,
        help="train one domain's SVF expert (DVC stage `train_expert@<domain>`)",
        description="Trains z for DOMAIN with params experts.DOMAIN (objective sft | rl | sft+rl), keeping "
        "the z with the best greedy val accuracy and checkpointing every experts.DOMAIN.checkpoint_every "
        "steps to models/checkpoints/DOMAIN (a killed run resumes there). Then evaluates base and expert "
        "on every domain's test split and writes models/experts/DOMAIN.safetensors and "
        "reports/experts/DOMAIN.{json,png} plus curve CSVs.",
    )
    train.add_argument("domain", help="a domain with an `experts.<domain>` entry in params.yaml")

    compare = _stage_command(
        commands,
        "compare-objectives",
        _compare_objectives_command,
        help="train one domain's z with each objective and RL algorithm and compare them (not a DVC stage)",
        description="From experts.DOMAIN in params.yaml, trains z with sft, rl (greedy REINFORCE, trl GRPO, trl "
        "RLOO), sft+rl (the configured algorithm) and sft+rl with trl RLOO, on the same base and seed; each keeps "
        "its best val z. Scores each on DOMAIN's test split with a paired bootstrap CI of the gain over the base "
        "and writes reports/objective_study/DOMAIN.{json,md}. Needs `dvc repro decompose` first.",
    )
    compare.add_argument("domain", help="a domain with an `experts.<domain>` entry in params.yaml")
    compare.add_argument("--rl-steps", type=int, default=60, help="RL steps of the RL-only variants (default 60)")

    _stage_command(
        commands,
        "calibrate",
        _calibrate_command,
        help="classification expert + dispatcher calibration (DVC stage `calibrate`)",
        description="Trains the classification expert on the train splits, scores every val and test prompt "
        "with both first-pass strategies (prompt: the base; cls: the classification expert), fits the "
        "controller's temperature (NLL) and `other` threshold (params dispatch.max_fallback) on val, and "
        "times pass 1, composition and pass 2. Writes models/dispatcher/ and reports/dispatch/ "
        "(metrics.json with routing accuracy, confusion matrix and ECE before/after; reliability.png; "
        "confusion.png).",
    )

    _stage_command(
        commands,
        "train-lora",
        _train_lora_command,
        help="the LoRA baseline: one PEFT adapter per expert domain (DVC stage `train_lora`)",
        description="Trains a LoRA adapter (params evaluate.lora: rank, alpha, target modules, steps) per "
        "domain that has an expert, with the experts' SFT objective on its train split, and saves "
        "models/lora/<domain>/ (PEFT safetensors) plus reports/lora/metrics.json.",
    )
    _stage_command(
        commands,
        "evaluate",
        _evaluate_command,
        help="every system on every test split through lm-eval (DVC stage `evaluate`)",
        description="Runs lm-eval's tasks (bayes_llm/evaluate/tasks, or params evaluate.tasks) with the "
        "registered model `bayes-llm` once per system in params evaluate.systems: base, each expert, "
        "oracle routing, adaptive:prompt|cls|fewshot and the LoRA baseline. Writes reports/eval/ "
        "(lm-eval results, summary.json for `dvc exp show`, gains with paired bootstrap CIs, results.md, "
        "scores.png, gains.png) and reports/README.md.",
    )

    bundle = _stage_command(
        commands,
        "bundle",
        _bundle_command,
        help="build bundles/<name>/ (DVC stage `bundle`); `bundle verify DIR` checks one",
        description="Copies the experts, the dispatcher and the SVD manifest into bundles/<params bundle.name>/ "
        "with manifest.json (version, base and SVD fingerprints, every file's sha256, params, metrics, git "
        "revision) and a model card (README.md).",
    )
    bundle_commands = bundle.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND")
    check = bundle_commands.add_parser(
        "verify",
        help="check a bundle's files against its manifest (and a base's fingerprint)",
        description="Refuses (exit 1, with the reason) a bundle with a missing, added or modified file, or, with "
        "--base, a base other than the one the experts were trained on.",
    )
    check.add_argument("bundle", type=Path)
    check.add_argument("--base", type=Path, help="a base model directory to check (e.g. models/base)")
    check.set_defaults(run=_verify_command)

    harness = commands.add_parser(
        "lm-eval",
        help="lm-eval's own CLI with the model `bayes-llm` registered (arguments pass through)",
        description="Runs lm-eval's command line after registering the model `bayes-llm` (modes: base, "
        "expert:<domain>, oracle, adaptive:prompt|cls). In the project root, for example:\n  bayes-llm lm-eval "
        "run --model bayes-llm --model_args mode=adaptive:prompt --tasks bayes_llm --include_path "
        "bayes_llm/evaluate/tasks --limit 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    harness.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    harness.set_defaults(run=_lm_eval_command)

    generate = commands.add_parser(
        "generate",
        help="answer prompts with self-adapted weights (two passes)",
        description="Pass 1 identifies each prompt's task (strategy), the calibrated Bayesian controller "
        "turns that into a posterior over experts and a blend of their singular-value scales (below the "
        "`other` threshold: the base weights), pass 2 answers greedily with the composed weights. "
        "fewshot: a CEM search over expert mixing weights on --examples first.",
    )
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    generate.add_argument("--examples", type=Path, help="fewshot: JSONL rows (prompt, answer, and "
                          "choices/tests) of the new task")  # fmt: skip
    generate.add_argument("--answer-kind", choices=["number", "letter", "code"], default="number",
                          help="fewshot: how the examples are scored")  # fmt: skip
    _add_adapt_options(generate)
    generate.set_defaults(run=_generate_command)

    chat = commands.add_parser(
        "chat",
        help="interactive two-pass session",
        description="Reads prompts from stdin and answers each with two-pass adaptation (see `generate`).",
    )
    _add_adapt_options(chat)
    chat.set_defaults(run=_chat_command)

    bench = commands.add_parser(
        "benchmark",
        help="training tokens/s of both families at several lengths → reports/base/benchmark.json",
        description="Times forward+backward+AdamW steps of the params' model shape for each family and "
        "sequence length, once at a fixed batch size and once at a fixed number of tokens per step, "
        "plus one step of transformers' reference Jamba scan for comparison. A measurement, not a "
        "test: run it on an otherwise idle machine.",
    )
    bench.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    bench.add_argument("--batch-size", type=int, default=16, help="batch of the fixed-batch sweep")
    bench.add_argument("--tokens-per-step", type=int, default=2048, help="tokens per step of the fixed-tokens sweep")
    bench.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    bench.add_argument("--families", nargs="+", default=["bamba", "jamba"], choices=["bamba", "jamba"])
    bench.set_defaults(run=_benchmark_command)

    check = commands.add_parser(
        "kernel-check",
        help="GPU: do the mamba-ssm kernels match the PyTorch path? → reports/base/kernel_check.json",
        description="Two runs over the same weights and inputs, since transformers binds the kernels at "
        "import. `reference`, where mamba-ssm is NOT importable: PyTorch-path logits, loss and gradients "
        "(CPU, and GPU if any) of the checkpoint and of a tiny Jamba, plus GPU training tokens/s. "
        "`compare`, with `pip install '.[gpu]'` on a CUDA machine: the same with the kernels, differences "
        "against the stated tolerance, and kernel tokens/s. Exits 1 when outside the tolerance.",
    )
    check.add_argument("step", choices=["reference", "compare"])
    check.add_argument("--checkpoint", type=Path, default=Path("models/base"), help="default: %(default)s")
    check.add_argument("--work", type=Path, default=Path("kernel-check"), help="reference files (default: %(default)s)")
    check.add_argument("--steps", type=int, default=10, help="timed training steps per benchmark run")
    check.set_defaults(run=_kernel_check_command)

    svf_bench = commands.add_parser(
        "svf-benchmark",
        help="cost of SVF: training step vs frozen base, merged/unmerged generation → reports/svf/benchmark.json",
        description="On a randomly initialised model of the params' shape and svf.targets/svf.mode: median "
        "time of a training step of the frozen base (backward to the inputs), of SVF (only z trains) "
        "and of a full fine-tune; greedy generation of the base, a merged expert and the unmerged "
        "parametrized model; z parameters vs base parameters. A measurement, not a test.",
    )
    svf_bench.add_argument("--batch-size", type=int, default=16, help="training batch")
    svf_bench.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    svf_bench.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (8 prompts)")
    svf_bench.add_argument("--repeats", type=int, default=9, help="timed rounds (median of each measurement)")
    svf_bench.set_defaults(run=_svf_benchmark_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        print(f"bayes-llm {args.command}: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
