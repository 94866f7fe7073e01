"""What SVF costs (not a test): training step vs the frozen base, generation merged vs unmerged.

Runs on a randomly initialised model of the params' shape (timings do not depend on the weights):
- training step (forward, backward, AdamW) at B×T tokens: the *frozen* base (no weight gradients,
  backward to the inputs — the least any adapter inside the network pays), *SVF* on the targets
  (only z trains; W′ composed once per step), and a *full* fine-tune for scale;
- greedy generation of a fixed number of new tokens: the base, a *merged* expert (z folded into the
  weights) and the *unmerged* parametrized model (W′ composed once per generate call);
- the number of z parameters against the base's.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, set_seed

from bayes_llm.config import Params, load_params
from bayes_llm.io import write_json
from bayes_llm.model.architecture import build_config
from bayes_llm.svf.decompose import svd_factors
from bayes_llm.svf.scaling import SVF, Composer
from bayes_llm.svf.targets import select_targets

REPORT = Path("reports/svf/benchmark.json")


def _interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per step, timed round-robin so that drift (clock, other load) hits all alike."""
    for step in steps.values():
        step()  # warm-up: allocators, first-call paths
    timings: dict[str, list[float]] = {key: [] for key in steps}
    for _ in tqdm(range(repeats), desc="svf benchmark", unit="round"):
        for key, step in steps.items():
            started = time.perf_counter()
            step()
            timings[key].append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in timings.items()}


def _train_step(model, ids: torch.Tensor, parameters: list, to_inputs: bool = False) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None
    embed = model.get_input_embeddings()

    def step() -> None:
        if to_inputs:
            embeds = embed(ids).detach().requires_grad_()
            model(inputs_embeds=embeds, labels=ids).loss.backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def benchmark(
    params: Params,
    batch_size: int = 16,
    seq_len: int = 128,
    generate_batch: int = 8,
    new_tokens: int = 64,
    repeats: int = 9,
    out: Path = REPORT,
) -> dict:
    set_seed(params.seed)
    vocab = params.tokenizer.vocab_size
    model = AutoModelForCausalLM.from_config(build_config(params.model, vocab, 0, 1, 2))
    names = select_targets(model, params.svf.targets)
    factors = {name: svd_factors(model.get_submodule(name).weight) for name in names}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
    prompts = torch.randint(3, vocab, (generate_batch, 16), generator=generator)
    z = {n: 1 + 0.1 * torch.randn(f.s.shape, generator=generator) for n, f in factors.items()}

    def generate(model) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)  # fmt: skip

        return step

    # One copy per configuration (tiny models), so that the timings can interleave.
    merged = copy.deepcopy(model).eval()
    Composer(merged, factors).merge(z)
    unmerged = copy.deepcopy(model).eval()
    SVF(unmerged, factors, mode=params.svf.mode, max_mult=params.svf.max_mult).load_z(z)
    frozen = copy.deepcopy(model).train().requires_grad_(False)
    adapted = copy.deepcopy(model).train()
    svf = SVF(adapted, factors, mode=params.svf.mode, max_mult=params.svf.max_mult)
    svf.load_z(z)
    full = copy.deepcopy(model).train()
    seconds = _interleaved_medians(
        {
            "generate_base": generate(model.eval()),
            "generate_merged": generate(merged),
            "generate_unmerged": generate(unmerged),
            "train_step_frozen": _train_step(frozen, ids, [], to_inputs=True),
            "train_step_svf": _train_step(adapted, ids, svf.parameters()),
            "train_step_full": _train_step(full, ids, list(full.parameters())),
        },
        repeats,
    )
    z_count = svf.parameter_count()
    base_count = sum(p.numel() for p in model.parameters())
    results = {
        "model": params.model.model_dump(include={"family", "hidden_size", "layers", "intermediate_size"}),
        "targets": params.svf.targets,
        "mode": params.svf.mode,
        "threads": torch.get_num_threads(),
        "train": {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats},
        "generate": {"batch_size": generate_batch, "new_tokens": new_tokens, "repeats": repeats},
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "svf_step_over_frozen": round(seconds["train_step_svf"] / seconds["train_step_frozen"], 3),
        "svf_step_over_full": round(seconds["train_step_svf"] / seconds["train_step_full"], 3),
        "merged_generate_over_base": round(seconds["generate_merged"] / seconds["generate_base"], 3),
        "unmerged_generate_over_base": round(seconds["generate_unmerged"] / seconds["generate_base"], 3),
        "z_parameters": z_count,
        "base_parameters": base_count,
        "z_share_of_base": round(z_count / base_count, 6),
        "targets_met": {
            "svf_step_le_1.35x_frozen": seconds["train_step_svf"] <= 1.35 * seconds["train_step_frozen"],
            "merged_generate_le_1.05x_base": seconds["generate_merged"] <= 1.05 * seconds["generate_base"],
        },
    }
    write_json(out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.svf_cost",
        description="Cost of SVF → reports/svf/benchmark.json. On a randomly initialised model of the params' shape "
        "and svf.targets/svf.mode: median time of a training step of the frozen base (backward to the inputs), of SVF "
        "(only z trains) and of a full fine-tune; greedy generation of the base, a merged expert and the unmerged "
        "parametrized model; z parameters vs base parameters. A measurement, not a test.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (8 prompts)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (median of each measurement)")
    args = parser.parse_args(argv)
    results = benchmark(load_params(args.params), batch_size=args.batch_size, seq_len=args.seq_len,
                        new_tokens=args.new_tokens, repeats=args.repeats)  # fmt: skip
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
