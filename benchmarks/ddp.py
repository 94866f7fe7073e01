"""Data-parallel expert training: does N processes' z equal one process's, and how much faster is it?

`python -m benchmarks.ddp` trains one domain's z from the pipeline's base, SVD and data (run `dvc
repro decompose` first): in one process (all cores) and as N processes under `accelerate launch`
(gloo, the cores split between them), with the same params, seed and global batches; and that twice,
with `distributed.shares` (each batch cut into fixed shares whose gradients are added in share order,
`--shares`, default N) and without (each process's gradient all-reduced). It writes
`reports/scale/ddp.json`: `processes`, `backend`, `shares`, `max_abs_z_diff` (final z, N processes
against one, with shares), `steps`, `seconds_1proc`, `seconds_nproc` (the training loop, validation
included), `speedup`, how the difference grows with the steps (`max_abs_z_diff_by_step`), how far
training moved z (`max_abs_z_change`, the scale of that difference), what the runs agree on besides
(val accuracy, the last losses); and under `all_reduce` the same for the runs without shares, with
where their difference comes from (`first_step_rounding`: step 1's gradient, whole batch against the
shares' sum, and what Adam's first step makes of that; `first_gradient`: whether the all-reduce adds
anything to the shares' sum).

Nothing here writes the pipeline's models or reports other than that file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from bayes_llm import paths
from bayes_llm.config import load_params, parse_params
from bayes_llm.errors import UserError
from bayes_llm.experts.distributed import Shards, relaunch, threads_per_process
from bayes_llm.io import write_json

REPORT = paths.REPORTS / "scale" / "ddp.json"
ROOT = Path(__file__).resolve().parents[1]


def split_rounding(svf, tokenizer, rows: list[dict], cfg, seed: int, processes: int) -> dict | None:
    """Where the N-process z departs from one process's, measured in one process: step 1's SFT
    gradient on the whole batch against the sum of the `processes` shares' gradients (what the
    all-reduce adds up), and the difference Adam's first step (lr · g/|g|) makes of it."""
    from bayes_llm.experts.distributed import sft_part_loss
    from bayes_llm.experts.objectives import sft_batch, sft_loss

    if cfg.sft_drop_hardest > 0 or cfg.sft_steps == 0 or cfg.train_precision != "fp32":
        return None  # the shares would gather across processes (there are none here), or no SFT step, or bf16
    picks = torch.randint(len(rows), (cfg.sft_batch_size,), generator=torch.Generator().manual_seed(seed * 1_000_003))
    batch = sft_batch(tokenizer, [rows[i] for i in picks.tolist()])
    parameters = svf.parameters()
    svf.model.train()

    def gradient(losses) -> torch.Tensor:
        for p in parameters:
            p.grad = None
        for loss in losses:
            loss.backward()  # accumulates: the shares' gradients add up as the all-reduce adds them
        g = torch.cat([p.grad.reshape(-1) for p in parameters]).clone()
        for p in parameters:
            p.grad = None
        return g

    whole = gradient([sft_loss(svf.model, batch)])
    threads = torch.get_num_threads()
    # each share on its process's threads (`relaunch` lets a user's OMP_NUM_THREADS win)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", threads_per_process(processes))))
    try:
        split = gradient([sft_part_loss(svf.model, batch, Shards(rank, processes), None) for rank in range(processes)])
    finally:
        torch.set_num_threads(threads)
    eps = 1e-8  # AdamW's default, as the trainer uses it
    step = (cfg.sft_learning_rate * (whole / (whole.abs() + eps) - split / (split.abs() + eps))).abs()
    worst = int(step.argmax())
    return {"max_abs_grad_diff": float((whole - split).abs().max()), "max_abs_grad": float(whole.abs().max()),
            "share_abs_grad_below_1e-7": round(float((whole.abs() < 1e-7).float().mean()), 5),
            "max_abs_first_adam_step_diff": float(step.max()), "abs_grad_there": float(whole[worst].abs()),
            "abs_grad_diff_there": float((whole - split)[worst].abs()),
            "gradients": {"whole": whole, "split": split}}  # fmt: skip


def train_worker(params_file: Path, domain: str, sft_steps: int, rl_steps: int, out: Path,
                 processes: int = 2, shares: int | None = None) -> None:  # fmt: skip
    """One run of the trainer (in every process of a distributed run); process 0 saves the final z."""
    from bayes_llm.data import prepared
    from bayes_llm.experts.trainer import Trainer
    from bayes_llm.model.load import load_base
    from bayes_llm.stages.train_expert import expert_domains
    from bayes_llm.svf.decompose import check_base, load_factors
    from bayes_llm.svf.scaling import SVF

    params = load_params(params_file)
    kind = expert_domains(params, domain)[domain]["answer_kind"]
    steps = sft_steps + rl_steps
    # The domain's own params with a short budget; validation only at the end of each phase.
    own = params.experts[domain]
    cfg = type(own).model_validate(own.model_dump() | {
        "objective": "+".join(name for name, n in (("sft", sft_steps), ("rl", rl_steps)) if n),
        "sft_steps": sft_steps, "rl_steps": rl_steps, "eval_every": steps, "checkpoint_every": steps,
    })  # fmt: skip
    shards = Shards.from_launcher(shares)
    model, tokenizer = load_base()
    factors, manifest = load_factors(paths.SVD)
    check_base(model, manifest, paths.SVD)
    svf = SVF(model, factors, mode=params.svf.mode, max_mult=params.svf.max_mult)
    rows = {split: prepared.read_split(paths.DATA, domain, split) for split in ("train", "val")}
    start = svf.z()
    one_all_reduce = shards.world == 1 and not shares
    rounding = split_rounding(svf, tokenizer, rows["train"], cfg, params.seed, processes) if one_all_reduce else None
    with tempfile.TemporaryDirectory() as checkpoints:
        trainer = Trainer(svf, tokenizer, kind, rows["train"], rows["val"], cfg, params.seed, Path(checkpoints),
                          manifest["svd_fingerprint"], params.base_eval.max_new_tokens[kind], progress=shards.main,
                          shards=shards)  # fmt: skip
        snapshots = _snapshot_z(trainer, svf, steps)
        first, hook = _keep_first_gradient()
        try:
            result = trainer.run()
        finally:
            hook.remove()
    if shards.main:
        gradients = {"first": first["gradient"], **(rounding.pop("gradients") if rounding else {})}
        save_file(snapshots, out / "z.safetensors")
        save_file(gradients, out / "gradients.safetensors")
        last = {phase: next(r["loss"] for r in reversed(result.curve) if r["phase"] == phase and "loss" in r)
                for phase, _ in result.phases}  # fmt: skip
        change = max(float((svf.z()[n] - z).abs().max()) for n, z in start.items())
        summary = {"seconds": result.seconds, "z_change": change, "last_loss": last, "rounding": rounding,
                   "val": [r["val_accuracy"] for r in result.curve if "val_accuracy" in r],
                   "threads": torch.get_num_threads(), "batch": {"sft": cfg.sft_batch_size, "rl": cfg.rl_batch_size}}
        (out / "run.json").write_text(json.dumps(summary))


def checkpoints_of(steps: int) -> list[int]:
    """The steps whose z both runs keep: 1, 2, 4, … and the last."""
    return sorted({2**i for i in range(steps.bit_length()) if 2**i <= steps} | {steps})


def _snapshot_z(trainer, svf, steps: int) -> dict:
    """z after each of checkpoints_of(steps), keyed `<step>/<matrix>` (filled while the trainer runs)."""
    snapshots: dict = {}
    finish = trainer._finish

    def finish_and_keep(step: int, record: dict) -> None:
        finish(step, record)
        if step + 1 in checkpoints_of(steps):
            snapshots.update({f"{step + 1}/{n}": z for n, z in svf.z().items()})

    trainer._finish = finish_and_keep
    return snapshots


def _keep_first_gradient() -> tuple[dict, RemovableHandle]:
    """The gradient of z the first optimizer step takes (after the all-reduce), kept under "gradient"
    when that step runs; and the hook's handle, to remove it."""
    kept: dict = {}

    def keep(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if not kept:  # the optimizer's parameters are z, in svf.parameters()' order
            kept["gradient"] = torch.cat([p.grad.reshape(-1) for group in optimizer.param_groups
                                          for p in group["params"]]).clone()  # fmt: skip

    return kept, register_optimizer_step_pre_hook(keep)


def _run(processes: int, shares: int | None, args: argparse.Namespace, out: Path) -> dict:
    out.mkdir(parents=True)
    worker = ["benchmarks.ddp", "--params", str(args.params), "--domain", args.domain, "--sft-steps",
              str(args.sft_steps), "--rl-steps", str(args.rl_steps), "--processes", str(args.processes),
              "--shares", str(shares or 0), "--worker", str(out)]  # fmt: skip
    # The workers import this module from wherever the project (the working directory) is.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if processes == 1:
        code = subprocess.run([sys.executable, "-m", *worker], env=env).returncode
    else:
        code = relaunch(processes, worker, env)
    if code != 0:
        raise UserError(f"the {processes}-process run failed (exit status {code})")
    return {**json.loads((out / "run.json").read_text()), "z": load_file(out / "z.safetensors"),
            "gradients": load_file(out / "gradients.safetensors")}


def compare(args: argparse.Namespace, shares: int | None, scratch: Path) -> dict:
    """One process against `args.processes`, both with `distributed.shares` = shares."""
    one = _run(1, shares, args, scratch / "one")
    many = _run(args.processes, shares, args, scratch / "many")
    by_step = {step: max(float((one["z"][n] - many["z"][n]).abs().max()) for n in one["z"] if n.startswith(f"{step}/"))
               for step in checkpoints_of(args.sft_steps + args.rl_steps)}  # fmt: skip
    return {
        "shares": shares,
        "max_abs_z_diff": by_step[args.sft_steps + args.rl_steps],
        "max_abs_z_change": one["z_change"],  # how far training moved z: the scale the diff is measured against
        "max_abs_z_diff_by_step": by_step,
        "seconds_1proc": round(one["seconds"], 3),
        "seconds_nproc": round(many["seconds"], 3),
        "speedup": round(one["seconds"] / many["seconds"], 3),
        "val_accuracy": {"1proc": one["val"], "nproc": many["val"]},
        "last_loss": {"1proc": one["last_loss"], "nproc": many["last_loss"]},
        **({} if shares else {"first_step_rounding": one["rounding"],
                              "first_gradient": _first_gradients(one["gradients"], many["gradients"])}),
        "threads": {"1proc": one["threads"], "per_process": many["threads"]},
        "z_values": sum(z.numel() for n, z in one["z"].items() if n.startswith(f"{args.sft_steps + args.rl_steps}/")),
        "global_batch": one["batch"],
    }


def benchmark(args: argparse.Namespace) -> dict:
    if args.processes < 2:
        raise UserError(f"--processes must be at least 2 (got {args.processes})")
    if args.sft_steps < 0 or args.rl_steps < 0 or args.sft_steps + args.rl_steps == 0:
        raise UserError("--sft-steps and --rl-steps must be >= 0, and not both 0")
    shares = args.shares or args.processes
    # The schema's own checks (shares >= processes, every batch and val split at least that large).
    load_params(args.params)  # a missing or broken file says so first
    raw = yaml.safe_load(args.params.read_text())
    raw["distributed"] = {**(raw.get("distributed") or {}), "processes": args.processes, "shares": shares}
    parse_params(raw, f"{args.params} with --processes {args.processes} --shares {shares}")
    with tempfile.TemporaryDirectory() as scratch:
        exact = compare(args, shares, Path(scratch, "shares"))
        all_reduce = compare(args, None, Path(scratch, "all_reduce"))
    common = ("threads", "z_values", "global_batch")
    report = {
        "processes": args.processes,
        "backend": "gloo",
        **{key: value for key, value in exact.items() if key not in common},
        "steps": args.sft_steps + args.rl_steps,
        "domain": args.domain,
        "phases": {"sft": args.sft_steps, "rl": args.rl_steps},
        **{key: exact[key] for key in common},
        "all_reduce": {key: value for key, value in all_reduce.items() if key not in common},
        "cpu_count": os.cpu_count(),
    }
    write_json(args.out, report)
    return report


def _first_gradients(one: dict, many: dict) -> dict | None:
    """Step 1's SFT gradient of z as each run's optimizer took it: N processes' all-reduced sum against
    one process's whole batch, and against the shares' gradients summed in one process (`split_rounding`).
    Equal to the latter, the all-reduce adds nothing: the whole difference is the split's rounding. (Two
    processes' sum is exact in any order; with more, gloo's ring may add in another order than rank order.)
    None when `split_rounding` is (an RL first step samples other rollouts per process)."""
    if "split" not in one:
        return None
    return {"max_abs_diff_nproc_vs_1proc": float((many["first"] - one["first"]).abs().max()),
            "max_abs_diff_nproc_vs_shares_summed_in_1proc": float((many["first"] - one["split"]).abs().max()),
            "max_abs_diff_1proc_vs_its_rounding_check": float((one["first"] - one["whole"]).abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ddp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--domain", default="math", help="a domain with an experts entry (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the data-parallel run (default: 2)")
    parser.add_argument("--shares", type=int, default=0,
                        help="distributed.shares of the exact runs (default: --processes); the all-reduce runs "
                             "(shares null) are compared too")  # fmt: skip
    parser.add_argument("--sft-steps", type=int, default=40, help="SFT steps (default: %(default)s)")
    parser.add_argument("--rl-steps", type=int, default=10, help="RL steps after SFT (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPORT, help="report file (default: %(default)s)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.worker:
            train_worker(args.params, args.domain, args.sft_steps, args.rl_steps, args.worker, args.processes,
                         args.shares or None)  # fmt: skip
            return 0
        print(json.dumps(benchmark(args), indent=2))
        return 0
    except UserError as error:
        print(f"benchmarks.ddp: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
