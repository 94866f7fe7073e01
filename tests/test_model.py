from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.models.jamba import modeling_jamba

from bayes_llm.config import ModelParams
from bayes_llm.model import jamba_scan
from bayes_llm.model.architecture import build_config
from bayes_llm.model.load import CheckpointError, load_checkpoint
from bayes_llm.model.tokenizer import train_tokenizer
from bayes_llm.rewards.answers import exact_match, extract_letter, extract_number, parses_as_python
from tests.tiny_models import FAMILIES, TEXTS, save_tiny_checkpoint

TINY = dict(hidden_size=32, layers=4, attention_heads=2, kv_heads=2, intermediate_size=64,
            mamba={"d_state": 8, "heads": 2, "chunk_size": 16}, max_length=128)  # fmt: skip


def test_tokenizer_round_trips_exactly_and_saves_its_settings(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, max_length=96)
    for text in ["Question: What is 3 + 4?\nAnswer: 7", "def f(n):\n    return n  *  2\n", "ünïcödé ✓ \t tabs  .", ""]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "left" and loaded.model_max_length == 96
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert loaded("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]


@pytest.mark.parametrize("family", ["bamba", "jamba"])
def test_mambaformer_layout_mamba_first_then_alternating(family):
    config = build_config(ModelParams(family=family, **TINY), 300, 0, 1, 2)
    model = AutoModelForCausalLM.from_config(config)
    kinds = ["attention" if hasattr(layer, "self_attn") else "mamba" for layer in model.model.layers]
    assert kinds == ["mamba", "attention", "mamba", "attention"]
    assert config.mambaformer == {"family": family, "attention_layers": [1, 3]}


def test_jamba_rejects_an_irregular_layout():
    with pytest.raises(ValueError, match="period"):
        build_config(ModelParams(family="jamba", attention_layers=[1, 2], **TINY), 300, 0, 1, 2)


def test_linear_scan_is_installed_and_matches_the_reference():
    assert not jamba_scan.kernels_available()
    assert modeling_jamba.mamba_selective_scan is jamba_scan.linear_selective_scan
    reference = modeling_jamba._reference_selective_scan
    torch.manual_seed(0)
    b, d, n, length = 2, 16, 4, 37  # an odd length, a last state with a gradient of its own
    inputs = [torch.randn(b, d, length), torch.randn(b, d, length), -torch.rand(d, n) * 3,
              torch.randn(b, n, length), torch.randn(b, n, length)]  # fmt: skip
    extra = dict(D=torch.randn(d), z=torch.randn(b, d, length), delta_bias=torch.randn(d), delta_softplus=True,
                 return_last_state=True)  # fmt: skip
    results = []
    for scan in (reference, jamba_scan.linear_selective_scan):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out, last = scan(*leaves, **extra)
        (out.square().sum() + last.sum()).backward()
        results.append((out.detach(), last.detach(), [leaf.grad for leaf in leaves]))
    (out_ref, last_ref, grads_ref), (out_lin, last_lin, grads_lin) = results
    # The same recurrence, fused and summed in another order: equal up to float rounding.
    torch.testing.assert_close(out_lin, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_lin, last_ref, rtol=1e-5, atol=1e-5)
    for grad_ref, grad_lin in zip(grads_ref, grads_lin, strict=True):
        torch.testing.assert_close(grad_lin, grad_ref, rtol=1e-5, atol=1e-5)


def test_jamba_model_trains_the_same_with_either_scan():
    set_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(ModelParams(family="jamba", **TINY), 300, 0, 1, 2))
    ids = torch.randint(3, 300, (2, 24))
    losses, grads = [], []
    for scan in (modeling_jamba._reference_selective_scan, jamba_scan.linear_selective_scan):
        modeling_jamba.mamba_selective_scan = scan
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].mamba.x_proj.weight.grad.clone())
    jamba_scan.install()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_scan_hands_cached_decoding_the_state_it_ends_in():
    """Cached decoding steps on from the scan's last state: one more step must equal a longer scan."""
    torch.manual_seed(0)
    b, d, n, length = 2, 16, 4, 12
    x, dt, z = torch.randn(b, d, length + 1), torch.randn(b, d, length + 1), torch.randn(b, d, length + 1)
    A, B, C = -torch.rand(d, n) * 3, torch.randn(b, n, length + 1), torch.randn(b, n, length + 1)
    D, bias = torch.randn(d), torch.randn(d)
    longer = jamba_scan.linear_selective_scan(x, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    _, last = jamba_scan.linear_selective_scan(x[..., :-1], dt[..., :-1], A, B[..., :-1], C[..., :-1], D=D,
                                               z=z[..., :-1], delta_bias=bias, delta_softplus=True,
                                               return_last_state=True)  # fmt: skip
    step = modeling_jamba.mamba_selective_state_update(last, x[..., -1], dt[..., -1], A, B[..., -1], C[..., -1], D=D,
                                                       z=z[..., -1], dt_bias=bias, dt_softplus=True)  # fmt: skip
    torch.testing.assert_close(step, longer[..., -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_checkpoint_families_load_and_generate(tmp_path, family):
    save_tiny_checkpoint(family, tmp_path / family)
    model, tokenizer = load_checkpoint(str(tmp_path / family))
    assert model.config.model_type == family and tokenizer.padding_side == "left"
    batch = tokenizer(["Question: What is 1 + 2?\nAnswer:", "Question: 3?"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(str(tmp_path / "empty"))
    broken = save_tiny_checkpoint("bamba", tmp_path / "broken")
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot load it"):
        load_checkpoint(str(broken))
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match=r"'gpt2' model; supported: bamba, jamba"):
        load_checkpoint(str(tmp_path / "gpt2"))


def test_saved_base_loads_with_stock_transformers_in_a_fresh_process(tmp_path):
    """No registration needed: a process that never imports bayes_llm loads it."""
    set_seed(0)
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, max_length=128)
    model = AutoModelForCausalLM.from_config(build_config(ModelParams(**TINY), len(tokenizer), 0, 1, 2))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 12]])
    expected = model(input_ids=ids).logits[0, -1, :4].tolist()
    code = (
        "import json, sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "assert 'bayes_llm' not in sys.modules\n"
        "print(json.dumps(m(input_ids=torch.tensor([[1, 5, 9, 12]])).logits[0, -1, :4].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == expected


def test_answer_extraction():
    assert extract_number(" 42<eos>") == "42" and extract_number(" -7 apples") == "-7" and extract_number("x") is None
    assert extract_letter(" B") == "B" and extract_letter(" I think C)") == "I"
    assert exact_match("number", " 42.0", "42") and not exact_match("number", " 41", "42")
    assert exact_match("letter", " C", "C") and not exact_match("letter", " c", "C")
    assert (
        parses_as_python("def f(n):\n    return n + 1\n")
        and not parses_as_python("def f(n) return")
        and not parses_as_python("  ")
    )


def test_kernel_check_reference_on_cpu_and_its_verdict(tmp_path):
    from safetensors.torch import load_file

    from benchmarks import kernel_check

    params = ModelParams(hidden_size=32, layers=2, attention_heads=2, kv_heads=2, intermediate_size=64)
    checkpoint = save_tiny_checkpoint("bamba", tmp_path / "ckpt")
    written = kernel_check.reference(checkpoint, tmp_path / "work", params, vocab=64)
    ref = load_file(written)
    assert {"checkpoint.cpu.dense.logits", "jamba.cpu.padded.logits", "jamba.cpu.train.grad"} <= set(ref)
    # Valid positions only: the padded batch has fewer logits rows than the dense one.
    assert ref["checkpoint.cpu.padded.logits"].shape[0] < ref["checkpoint.cpu.dense.logits"].shape[0]
    own = {k.removeprefix("checkpoint.cpu."): v for k, v in ref.items() if k.startswith("checkpoint.cpu.")}
    assert kernel_check._difference(own, own)["within_tolerance"]
    shifted = dict(own, **{"dense.logits": own["dense.logits"] + 0.05})
    verdict = kernel_check._difference(shifted, own)
    assert not verdict["within_tolerance"] and verdict["dense"]["logits_max_abs"] == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(kernel_check.KernelCheckError, match="CUDA GPU with mamba-ssm"):
        kernel_check.compare(checkpoint, tmp_path / "work", params, vocab=64)


def test_the_code_val_score_runs_the_tests_not_only_the_parser(monkeypatch):
    from bayes_llm.model import greedy

    rows = [{"prompt": "Write f(n) that doubles n.", "answer": "", "tests": ["assert f(2) == 4"]}] * 2
    programs = iter([["def f(n):\n    return n + n\n", "def f(n):\n    return n * 3\n"]])  # both parse
    monkeypatch.setattr(greedy, "greedy_completions", lambda *args, **kwargs: next(programs))
    result = greedy.domain_accuracy(None, None, rows, "code", 32, 2)
    assert result["accuracy"] == 0.5 and result["items"] == 2
