"""Training throughput of the MambaFormer families at several sequence lengths (not a test).

Same batch size at every length, so tokens/s compares like with like: a linear-time model keeps
its throughput as T grows (attention's own T² term aside).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, set_seed
from transformers.models.jamba import modeling_jamba

from bayes_llm.config import ModelParams
from bayes_llm.io import write_json
from bayes_llm.model import jamba_scan
from bayes_llm.model.architecture import build_config

REPORT = Path("reports/base/benchmark.json")


def _tokens_per_second(model, batch_size: int, seq_len: int, steps: int, vocab: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    timings = []
    for step in range(steps + 1):  # the first step warms up allocators and is not counted
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            timings.append(time.perf_counter() - started)
    return batch_size * seq_len / (sum(timings) / len(timings))


def benchmark(
    model_params: ModelParams,
    lengths=(128, 512, 1024),
    batch_size: int = 16,
    steps: int = 2,
    vocab: int = 1024,
    families=("bamba", "jamba"),
    reference_jamba: bool = True,
    out: Path = REPORT,
) -> dict:
    results: dict = {
        "batch_size": batch_size,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "kernels": jamba_scan.kernels_available(),
        "families": {},
    }
    runs = [(f, t) for f in families for t in lengths]
    for family, seq_len in tqdm(runs, desc="benchmark", unit="run"):
        set_seed(0)
        params = model_params.model_copy(update={"family": family, "max_length": max(lengths)})
        model = AutoModelForCausalLM.from_config(build_config(params, vocab, 0, 1, 2)).train()
        entry = results["families"].setdefault(family, {"parameters": sum(p.numel() for p in model.parameters())})
        entry[f"T{seq_len}_tokens_per_second"] = round(_tokens_per_second(model, batch_size, seq_len, steps, vocab), 1)
    for entry in results["families"].values():
        if f"T{lengths[0]}_tokens_per_second" in entry and f"T{lengths[-1]}_tokens_per_second" in entry:
            ratio = entry[f"T{lengths[-1]}_tokens_per_second"] / entry[f"T{lengths[0]}_tokens_per_second"]
            entry[f"ratio_T{lengths[-1]}_over_T{lengths[0]}"] = round(ratio, 3)
    if reference_jamba and "jamba" in families and not jamba_scan.kernels_available():
        # transformers' own O(L²)-backward scan, one step at the shortest length, for comparison.
        modeling_jamba.mamba_selective_scan = modeling_jamba._reference_selective_scan
        try:
            set_seed(0)
            params = model_params.model_copy(update={"family": "jamba", "max_length": max(lengths)})
            model = AutoModelForCausalLM.from_config(build_config(params, vocab, 0, 1, 2)).train()
            speed = _tokens_per_second(model, batch_size, lengths[0], 1, vocab)
            results["families"]["jamba"][f"reference_scan_T{lengths[0]}_tokens_per_second"] = round(speed, 1)
        finally:
            jamba_scan.install()
    write_json(out, results)
    return results
