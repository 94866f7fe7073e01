from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM, set_seed

from bayes_llm.cli import main
from bayes_llm.svf import scaling
from bayes_llm.svf.blend import blend_scales, blend_weights
from bayes_llm.svf.decompose import SVDError, check_base, decompose, load_factors, read_manifest
from bayes_llm.svf.expert import Expert, ExpertFileError, load_expert, read_expert, save_expert
from bayes_llm.svf.scaling import SVF, Composer, effective_scale
from bayes_llm.svf.targets import PRESETS, TargetError, select_targets
from tests.tiny_models import FAMILIES, save_tiny_checkpoint, tiny_config

IDS = torch.tensor([[5, 17, 42, 9, 77, 3, 120, 64], [8, 8, 200, 31, 2, 90, 14, 7]])


def tiny(family: str = "bamba", seed: int = 0):
    set_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, 300)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def decomposed(tmp_path):
    model = tiny()
    decompose(model, "all", tmp_path / "svd", progress=False)
    factors, manifest = load_factors(tmp_path / "svd")
    return model, factors, manifest, tmp_path / "svd"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_resolves_on_every_family(family, preset):
    model = tiny(family)
    if preset == "mamba" and family in ("llama", "qwen2"):
        with pytest.raises(TargetError, match="matches no linear layer"):
            select_targets(model, preset)
        return
    names = select_targets(model, preset)
    assert names and "lm_head" not in names
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    if preset == "all":
        parts = [n for p in ("mlp", "attn", "mamba") if (p, family) != ("mamba", "llama") for n in _safe(model, p)]
        assert sorted(names) == sorted(parts)


def _safe(model, preset):
    try:
        return select_targets(model, preset)
    except TargetError:
        return []


def test_mamba_preset_includes_the_mamba1_x_and_dt_projections():
    names = select_targets(tiny("jamba"), "mamba")
    assert {n.rsplit(".", 1)[1] for n in names} == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    with pytest.raises(TargetError, match="invalid pattern"):
        select_targets(tiny(), ["(unclosed"])


@pytest.mark.parametrize("family", ["bamba", "jamba", "zamba2"])
def test_decompose_reconstructs_within_1e5_and_checks_the_base(family, tmp_path):
    model = tiny(family)
    report = decompose(model, "all", tmp_path / "svd", progress=False)
    assert report["max_relative_error"] <= 1e-5
    factors, manifest = load_factors(tmp_path / "svd")
    assert report["matrices"] == len(factors) == len(select_targets(model, "all"))
    for name, f in factors.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.allclose((f.u * f.s) @ f.vh, weight, atol=1e-5)
        assert bool((f.s[:-1] >= f.s[1:]).all())
    check_base(model, manifest, tmp_path / "svd")
    with pytest.raises(SVDError, match="decomposed from another base"):
        check_base(tiny(family, seed=1), manifest, tmp_path / "svd")


def test_decomposition_is_deterministic_and_tampering_is_refused(decomposed, tmp_path):
    model, _, manifest, svd_dir = decomposed
    decompose(model, "all", tmp_path / "again", progress=False)
    assert read_manifest(tmp_path / "again") == manifest
    layer = svd_dir / "layer_000.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 1
    layer.write_bytes(bytes(data))
    with pytest.raises(SVDError, match="sha256 differs"):
        load_factors(svd_dir)
    with pytest.raises(SVDError, match="not found"):
        load_factors(tmp_path / "nowhere")


@pytest.mark.parametrize("mode", ["scale", "official"])
def test_svf_at_identity_equals_the_base_bit_for_bit(decomposed, mode):
    model, factors, _, _ = decomposed
    base_logits = logits(model)
    base_tokens = model.generate(IDS, max_new_tokens=6, do_sample=False)
    svf = SVF(model, factors, mode=mode)
    assert torch.equal(logits(model), base_logits)
    assert torch.equal(model.generate(IDS, max_new_tokens=6, do_sample=False), base_tokens)
    assert all(torch.equal(s, torch.ones_like(s)) for s in svf.scales().values())
    svf.detach()
    assert torch.equal(logits(model), base_logits)


def test_gradients_reach_only_z(decomposed):
    model, factors, _, _ = decomposed
    svf = SVF(model, factors)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".z") for n in trainable)
    assert len(trainable) == len(factors)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in svf.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".z"))
    svf.detach()
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags come back


def test_weights_are_composed_once_per_forward_and_generate_call(decomposed, monkeypatch):
    model, factors, _, _ = decomposed
    SVF(model, factors)
    calls = []
    original = scaling.SingularValueScaling.forward
    monkeypatch.setattr(scaling.SingularValueScaling, "forward", lambda self, w: calls.append(1) or original(self, w))
    logits(model)
    assert len(calls) == len(factors)
    calls.clear()
    model.generate(IDS, max_new_tokens=5, do_sample=False)
    assert len(calls) == len(factors)


def _perturb(svf: SVF, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    svf.load_z({n: z + 0.3 * torch.randn(z.shape, generator=generator) for n, z in svf.z().items()})


@pytest.mark.parametrize("mode", ["scale", "official"])
def test_merge_is_exact_and_unmerge_restores_the_base(decomposed, mode):
    model, factors, _, _ = decomposed
    base_logits = logits(model)
    svf = SVF(model, factors, mode=mode)
    _perturb(svf)
    adapted = logits(model)
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    scales = svf.scales()
    svf.detach()
    composer = Composer(model, factors)
    composer.merge(scales)
    assert not parametrize.is_parametrized(model)
    assert torch.equal(logits(model), adapted)
    composer.unmerge()
    assert torch.equal(logits(model), base_logits)
    # Folding at detach gives the same weights as the composer.
    svf = SVF(model, factors, mode=mode)
    _perturb(svf)
    svf.detach(merge=True)
    assert torch.equal(logits(model), adapted)


def test_official_mode_keeps_the_sum_of_singular_values():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5])
    scale = effective_scale(torch.tensor([1.0, -2.0, 0.3, 3.0]), sigma, "official", max_mult=2.0)
    assert torch.allclose((sigma * scale).sum(), sigma.sum())
    assert not torch.allclose(scale, torch.ones(4))
    with pytest.raises(ValueError, match="max_mult > 1"):
        SVF(tiny(), {}, mode="official", max_mult=1.0)


def _expert(manifest, factors, domain="math", seed=0, mode="scale") -> Expert:
    generator = torch.Generator().manual_seed(seed)
    z = {n: 1 + 0.1 * torch.randn(f.s.shape, generator=generator) for n, f in factors.items()}
    return Expert(domain=domain, mode=mode, max_mult=2.0, z=z, base_fingerprint=manifest["base_fingerprint"],
                  svd_fingerprint=manifest["svd_fingerprint"], training={"steps": 3}, metrics={"acc": 0.5})  # fmt: skip


def test_expert_file_round_trips_and_refuses_another_base(decomposed, tmp_path):
    model, factors, manifest, _ = decomposed
    expert = _expert(manifest, factors)
    save_expert(expert, tmp_path / "math.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    loaded = load_expert(tmp_path / "math.safetensors", manifest)
    assert loaded.domain == "math" and loaded.training == {"steps": 3} and loaded.transferred_from is None
    assert all(torch.equal(loaded.z[n], expert.z[n]) for n in factors)

    other = tiny(seed=1)
    decompose(other, "all", tmp_path / "svd2", progress=False)
    other_manifest = read_manifest(tmp_path / "svd2")
    with pytest.raises(ExpertFileError, match="trained on another base"):
        load_expert(tmp_path / "math.safetensors", other_manifest)
    moved = load_expert(tmp_path / "math.safetensors", other_manifest, transfer=True)
    assert moved.transferred_from["base_fingerprint"] == manifest["base_fingerprint"]
    assert moved.base_fingerprint == other_manifest["base_fingerprint"]

    decompose(model, "mlp", tmp_path / "svd_mlp", progress=False)
    with pytest.raises(ExpertFileError, match="do not fit this decomposition"):
        load_expert(tmp_path / "math.safetensors", read_manifest(tmp_path / "svd_mlp"), transfer=True)


def test_corrupt_truncated_or_foreign_files_are_refused(decomposed, tmp_path):
    _, factors, manifest, _ = decomposed
    path = tmp_path / "e.safetensors"
    save_expert(_expert(manifest, factors), path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 not safetensors at all")
    save_file({"x": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    for name, message in [("truncated", "truncated or corrupt"), ("garbage", "truncated or corrupt"),
                          ("foreign", "not a bayes-llm SVF expert"), ("missing", "not found")]:  # fmt: skip
        with pytest.raises(ExpertFileError, match=message):
            read_expert(tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("mode", ["weighted_average", "top_k", "max"])
def test_blend_weights_sum_to_one(mode):
    weights = blend_weights({"math": 0.5, "code": 0.3, "reasoning": 0.2}, mode, top_k=2)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert list(weights) == {"weighted_average": ["math", "code", "reasoning"], "top_k": ["math", "code"],
                             "max": ["math"]}[mode]  # fmt: skip
    assert blend_weights({"a": 0.25, "b": 0.75}, "top_k", 1) == {"b": 1.0}
    with pytest.raises(ValueError, match="all zero"):
        blend_weights({"a": 0.0}, mode)
    with pytest.raises(ValueError, match="finite"):
        blend_weights({"a": float("nan")}, mode)


def test_official_experts_blend_in_effective_scale_space(decomposed):
    _, factors, manifest, _ = decomposed
    a = _expert(manifest, factors, "math", seed=1, mode="official")
    b = _expert(manifest, factors, "code", seed=2, mode="official")
    blended = blend_scales({"math": a.scales(factors), "code": b.scales(factors)}, {"math": 1.0, "code": 1.0})
    name = next(iter(factors))
    expected = (a.scales(factors)[name] + b.scales(factors)[name]) / 2
    assert torch.allclose(blended[name], expected)
    naive = effective_scale((a.z[name] + b.z[name]) / 2, factors[name].s, "official")
    assert not torch.allclose(blended[name], naive)
    only_a = blend_scales({"math": a.scales(factors), "code": b.scales(factors)}, {"math": 0.6, "code": 0.4}, "max")
    assert torch.equal(only_a[name], a.scales(factors)[name])


def test_decompose_stage_writes_models_svd_and_the_report(workdir, capsys):
    (workdir / "params.yaml").write_text("data: {domains: {}}\nsvf: {targets: mamba}\n")
    assert main(["decompose", "--quiet"]) == 1  # no base yet: a clear error, nothing written
    assert "run `dvc repro base` first" in capsys.readouterr().err
    assert not (workdir / "models/svd").exists()
    save_tiny_checkpoint("jamba", workdir / "models/base")
    assert main(["decompose", "--quiet"]) == 0
    report = json.loads((workdir / "reports/svf/decompose.json").read_text())
    assert report["matrices"] == 4 and report["max_relative_error"] <= 1e-5
    assert read_manifest(workdir / "models/svd")["svd_fingerprint"] == report["svd_fingerprint"]
