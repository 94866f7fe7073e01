"""Training throughput of the MambaFormer families at several sequence lengths (not a test).

Two views: a fixed batch size (memory per step grows with T: a long step also pays for moving
bigger tensors) and a fixed number of tokens per step (the same work and memory at every T, so
what remains is the cost of length itself). A linear-time model keeps its throughput as T grows
in the second view, attention's own T² term aside.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, set_seed
from transformers.models.jamba import modeling_jamba

from bayes_llm.config import ModelParams, load_params
from bayes_llm.io import write_json
from bayes_llm.model import jamba_scan
from bayes_llm.model.architecture import build_config

REPORT = Path("reports/base/benchmark.json")


def _tokens_per_second(model, batch_size: int, seq_len: int, steps: int, vocab: int) -> float:
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    timings = []
    for step in range(steps + 1):  # the first step warms up allocators (and compiles kernels): not counted
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock
        if step:
            timings.append(time.perf_counter() - started)
    return batch_size * seq_len / (sum(timings) / len(timings))


def _sweep(model_params: ModelParams, lengths, batch_of, steps: int, vocab: int, families, desc: str,
           device: str = "cpu") -> dict:  # fmt: skip
    out: dict = {}
    for family, seq_len in tqdm([(f, t) for f in families for t in lengths], desc=desc, unit="run"):
        set_seed(0)
        params = model_params.model_copy(update={"family": family, "max_length": max(lengths)})
        model = AutoModelForCausalLM.from_config(build_config(params, vocab, 0, 1, 2)).to(device).train()
        entry = out.setdefault(family, {"parameters": sum(p.numel() for p in model.parameters())})
        batch = batch_of(seq_len)
        entry[f"T{seq_len}_batch"] = batch
        entry[f"T{seq_len}_tokens_per_second"] = round(_tokens_per_second(model, batch, seq_len, steps, vocab), 1)
    for entry in out.values():
        ratio = entry[f"T{lengths[-1]}_tokens_per_second"] / entry[f"T{lengths[0]}_tokens_per_second"]
        entry[f"ratio_T{lengths[-1]}_over_T{lengths[0]}"] = round(ratio, 3)
    return out


def benchmark(
    model_params: ModelParams,
    lengths=(128, 512, 1024),
    batch_size: int = 16,
    tokens_per_step: int = 2048,
    steps: int = 2,
    vocab: int = 1024,
    families=("bamba", "jamba"),
    reference_jamba: bool = True,
    device: str = "cpu",
    out: Path | None = REPORT,
) -> dict:
    results: dict = {"steps": steps, "device": _device_name(device), "kernels": jamba_scan.kernels_available()}
    if device == "cpu":
        results["threads"] = torch.get_num_threads()
    fixed_batch = _sweep(model_params, lengths, lambda _: batch_size, steps, vocab, families, "fixed batch", device)
    results["fixed_batch"] = {"batch_size": batch_size, **fixed_batch}
    per_length = lambda t: max(1, tokens_per_step // t)  # noqa: E731
    fixed_tokens = _sweep(model_params, lengths, per_length, steps, vocab, families, "fixed tokens", device)
    results["fixed_tokens"] = {"tokens_per_step": tokens_per_step, **fixed_tokens}
    if reference_jamba and device == "cpu" and "jamba" in families and not jamba_scan.kernels_available():
        # transformers' own O(L²)-backward scan, one step at the shortest length, for comparison.
        modeling_jamba.mamba_selective_scan = modeling_jamba._reference_selective_scan
        try:
            set_seed(0)
            params = model_params.model_copy(update={"family": "jamba", "max_length": max(lengths)})
            model = AutoModelForCausalLM.from_config(build_config(params, vocab, 0, 1, 2)).train()
            speed = _tokens_per_second(model, batch_size, lengths[0], 1, vocab)
            results["fixed_batch"]["jamba"][f"reference_scan_T{lengths[0]}_tokens_per_second"] = round(speed, 1)
        finally:
            jamba_scan.install()
    if out is not None:
        write_json(out, results)
    return results


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training_speed",
        description="Training tokens/s of both families at several lengths → reports/base/benchmark.json. Times "
        "forward+backward+AdamW steps of the params' model shape for each family and sequence length, once at a fixed "
        "batch size and once at a fixed number of tokens per step, plus one step of transformers' reference Jamba "
        "scan for comparison. A measurement, not a test: run it on an otherwise idle machine.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the fixed-batch sweep")
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="tokens per step of the fixed-tokens sweep")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--families", nargs="+", default=["bamba", "jamba"], choices=["bamba", "jamba"])
    args = parser.parse_args(argv)
    params = load_params(args.params)
    results = benchmark(params.model, lengths=tuple(args.lengths), batch_size=args.batch_size,
                        tokens_per_step=args.tokens_per_step, steps=args.steps, vocab=params.tokenizer.vocab_size,
                        families=tuple(args.families))  # fmt: skip
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
