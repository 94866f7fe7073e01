"""Do the mamba-ssm kernels compute the same model as the PyTorch path? A GPU check, not a test.

transformers binds the kernels when its modeling modules are imported, so one process cannot run
both paths. The check is two runs over the same inputs and weights:

1. `reference`, in an environment where mamba-ssm is *not* importable: logits, training loss and
   gradients of the PyTorch path (on the CPU, and on the GPU when there is one), and training
   tokens/s of that path; it also saves the tiny Jamba it builds so that both runs use one set of
   weights.
2. `compare`, with mamba-ssm and causal-conv1d importable and a GPU: the same with the kernels, the
   differences against both references, pass/fail against `TOLERANCE`, and the speed-up.

Inputs are fixed random token ids, one dense batch and one left-padded batch, long enough to span
several SSD chunks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, set_seed

from bayes_llm.config import ModelParams, load_params
from bayes_llm.errors import UserError
from bayes_llm.io import atomic_path, write_json
from bayes_llm.model import jamba_scan
from bayes_llm.model.architecture import build_config
from benchmarks.training_speed import benchmark

REPORT = Path("reports/base/kernel_check.json")
# fp32 everywhere. The kernels reorder sums (chunked scans, fused conv) and Triton's dots may use
# TF32, so bit-equality is not expected; what must hold is agreement far below what changes an answer.
TOLERANCE = {"logits_max_abs": 1e-2, "top1_agreement": 0.999, "loss_abs": 1e-3, "grad_rel_l2": 1e-2}
BATCH, SEQ_LEN, PAD = 4, 512, 96


class KernelCheckError(UserError):
    pass


def _inputs(vocab: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ_LEN), generator=generator)
    padded_mask = torch.ones_like(ids)
    padded_mask[1::2, :PAD] = 0  # every other row left-padded, as batched generation does
    padded_ids = ids.masked_fill(padded_mask == 0, 0)
    return {
        "dense": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        "padded": {"input_ids": padded_ids, "attention_mask": padded_mask},
    }


def _measure(model, inputs: dict[str, dict[str, torch.Tensor]], device: str) -> dict[str, torch.Tensor]:
    """Eval-mode logits per input (valid positions only), and the train-mode loss and gradient."""
    model = model.to(device)
    out: dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad():
        for name, batch in inputs.items():
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits
            out[f"{name}.logits"] = logits[batch["attention_mask"].bool()].float().cpu()
    model.train()
    model.zero_grad(set_to_none=True)
    ids = inputs["dense"]["input_ids"].to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out["train.loss"] = loss.detach().float().cpu().reshape(1)
    out["train.grad"] = torch.cat([p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return out


def _models(checkpoint: Path, work: Path, params: ModelParams, vocab: int) -> dict[str, Path]:
    """The pipeline's checkpoint, plus a tiny Jamba (the Mamba-1 family) saved once by `reference`."""
    jamba = work / "jamba"
    if not (jamba / "config.json").is_file():
        set_seed(0)
        config = build_config(params.model_copy(update={"family": "jamba"}), vocab, 0, 1, 2)
        AutoModelForCausalLM.from_config(config).save_pretrained(jamba)
    return {"checkpoint": checkpoint, "jamba": jamba}


def _load(path: Path):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as error:  # no checkpoint there, truncated or corrupt weights
        raise KernelCheckError(f"{path}: cannot load the checkpoint: {type(error).__name__}: {error}") from None


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def reference(checkpoint: Path, work: Path, params: ModelParams, vocab: int, steps: int = 10) -> Path:
    if jamba_scan.kernels_available():
        raise KernelCheckError("reference needs the PyTorch path: run it where mamba-ssm is not importable")
    work.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, path in _models(checkpoint, work, params, vocab).items():
        model = _load(path)
        inputs = _inputs(model.config.vocab_size)
        for device in _devices():
            for key, value in _measure(model, inputs, device).items():
                tensors[f"{name}.{device}.{key}"] = value.contiguous()
    with atomic_path(work / "reference.safetensors") as tmp:  # never a half-written reference
        save_file(tensors, tmp)
    if torch.cuda.is_available():
        speed = benchmark(params, steps=steps, vocab=vocab, device="cuda", out=None)
        write_json(work / "pytorch_speed.json", speed)
    return work / "reference.safetensors"


def _difference(kernel: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    result: dict = {}
    for name in ("dense", "padded"):
        a, b = kernel[f"{name}.logits"], ref[f"{name}.logits"]
        result[name] = {
            "logits_max_abs": float((a - b).abs().max()),
            "logits_mean_abs": float((a - b).abs().mean()),
            "logits_max_abs_reference": float(b.abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        }
    grad_a, grad_b = kernel["train.grad"], ref["train.grad"]
    result["train"] = {
        "loss_kernels": float(kernel["train.loss"]),
        "loss_reference": float(ref["train.loss"]),
        "loss_abs": float((kernel["train.loss"] - ref["train.loss"]).abs()),
        "grad_rel_l2": float((grad_a - grad_b).norm() / grad_b.norm()),
    }
    result["within_tolerance"] = all(
        result[n]["logits_max_abs"] <= TOLERANCE["logits_max_abs"]
        and result[n]["top1_agreement"] >= TOLERANCE["top1_agreement"]
        for n in ("dense", "padded")
    ) and (
        result["train"]["loss_abs"] <= TOLERANCE["loss_abs"]
        and result["train"]["grad_rel_l2"] <= TOLERANCE["grad_rel_l2"]
    )
    return result


def compare(checkpoint: Path, work: Path, params: ModelParams, vocab: int, steps: int = 10, out: Path = REPORT) -> dict:
    if not (jamba_scan.kernels_available() and torch.cuda.is_available()):
        raise KernelCheckError(
            "compare needs a CUDA GPU with mamba-ssm and causal-conv1d importable (pip install '.[gpu]')"
        )
    if not (work / "reference.safetensors").is_file():
        raise KernelCheckError(f"no reference in {work}: run `python -m benchmarks.kernel_check reference` first")
    import causal_conv1d
    import mamba_ssm

    ref = load_file(work / "reference.safetensors")
    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mamba_ssm": mamba_ssm.__version__,
        "causal_conv1d": causal_conv1d.__version__,
        "inputs": {"batch": BATCH, "seq_len": SEQ_LEN, "left_pad_rows": "every other", "left_pad": PAD},
        "tolerance": TOLERANCE,
        "models": {},
    }
    for name, path in _models(checkpoint, work, params, vocab).items():
        model = _load(path)
        kernel = _measure(model, _inputs(model.config.vocab_size), "cuda")
        report["models"][name] = {"family": model.config.model_type}
        for device in _devices():
            prefix = f"{name}.{device}."
            reference_tensors = {k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)}
            report["models"][name][f"vs_pytorch_{device}"] = _difference(kernel, reference_tensors)
    report["within_tolerance"] = all(
        entry[key]["within_tolerance"] for entry in report["models"].values() for key in entry if key.startswith("vs_")
    )
    speed = {"kernels": benchmark(params, steps=steps, vocab=vocab, device="cuda", out=None)}
    if (work / "pytorch_speed.json").is_file():
        speed["pytorch"] = json.loads((work / "pytorch_speed.json").read_text())
    report["training_tokens_per_second"] = speed
    write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_check",
        description="GPU: do the mamba-ssm kernels match the PyTorch path? → reports/base/kernel_check.json. Two runs "
        "over the same weights and inputs, since transformers binds the kernels at import. `reference`, where "
        "mamba-ssm is NOT importable: PyTorch-path logits, loss and gradients (CPU, and GPU if any) of the checkpoint "
        "and of a tiny Jamba, plus GPU training tokens/s. `compare`, with `pip install '.[gpu]'` on a CUDA machine: "
        "the same with the kernels, differences against the stated tolerance, and kernel tokens/s. Exits 1 when "
        "outside the tolerance.",
    )
    parser.add_argument("step", choices=["reference", "compare"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--checkpoint", type=Path, default=Path("models/base"), help="default: %(default)s")
    parser.add_argument("--work", type=Path, default=Path("kernel-check"),
                        help="reference files (default: %(default)s)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per benchmark run")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.step == "reference":
        print(reference(args.checkpoint, args.work, params.model, params.tokenizer.vocab_size, args.steps))
        return 0
    report = compare(args.checkpoint, args.work, params.model, params.tokenizer.vocab_size, args.steps)
    print(json.dumps(report, indent=2))
    return 0 if report["within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
