from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bayes_llm.bundle.manifest import BundleError, verify
from bayes_llm.cli import main
from bayes_llm.model.load import load_base
from tests.conftest import enter_copy

BUNDLE = Path("bundles/bayes-llm-experts")


@pytest.fixture
def project(full_smoke_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return enter_copy(full_smoke_project, tmp_path, monkeypatch)


def test_bundle_holds_experts_dispatcher_manifest_and_card(project):
    manifest = verify(BUNDLE, Path("models/base"))
    assert manifest["version"] == "0.1.0" and set(manifest["experts"]) == {"math", "code", "reasoning"}
    svd = json.loads(Path("models/svd/svd.json").read_text())
    assert manifest["base_fingerprint"] == svd["base_fingerprint"]
    assert manifest["svd_fingerprint"] == svd["svd_fingerprint"]
    assert {"experts/math.safetensors", "dispatcher/dispatcher.json", "svd.json", "README.md"} <= set(manifest["files"])
    assert manifest["metrics"]["base.mean"] == json.loads(Path("reports/eval/summary.json").read_text())["base.mean"]
    card = (BUNDLE / "README.md").read_text()
    assert "bayes-llm bundle verify" in card and "| adaptive:prompt |" in card
    assert main(["bundle", "verify", str(BUNDLE), "--base", "models/base"]) == 0


def test_generate_answers_from_a_verified_bundle(project, capsys):
    assert main(["generate", "--bundle", str(BUNDLE), "--prompt", "What is 2 + 2?", "--max-new-tokens", "3",
                 "--show-experts"]) == 0  # fmt: skip
    assert "[posterior:" in capsys.readouterr().out
    # past the model's context (the smoke model's 256 tokens) it would answer garbage: refused, as the server does
    assert main(["generate", "--bundle", str(BUNDLE), "--prompt", "What is 3 + 4? " * 40]) == 1
    assert main(["generate", "--bundle", str(BUNDLE), "--prompt", "What is 2 + 2?", "--max-new-tokens", "9999"]) == 1
    err = capsys.readouterr().err
    assert err.count("more than the model's context of 256 tokens") == 2 and "with 9999 new tokens" in err
    (BUNDLE / "dispatcher/dispatcher.json").write_text("{}")
    assert main(["generate", "--bundle", str(BUNDLE), "--prompt", "What is 2 + 2?"]) == 1
    assert "sha256 differs" in capsys.readouterr().err


@pytest.mark.parametrize("tamper", ["modify", "delete", "add", "add a manifest"])
def test_a_tampered_bundle_is_refused(project, tamper, capsys):
    expert = BUNDLE / "experts/math.safetensors"
    if tamper == "modify":
        data = bytearray(expert.read_bytes())
        data[-1] ^= 1
        expert.write_bytes(bytes(data))
    elif tamper == "delete":
        expert.unlink()
    elif tamper == "add":
        (BUNDLE / "experts/extra.safetensors").write_bytes(b"x")
    else:  # only the bundle's own manifest is left out of the hashes
        (BUNDLE / "experts/manifest.json").write_text("{}")
    reason = {"modify": "sha256 differs", "delete": "missing"}.get(tamper, "not in the manifest")
    with pytest.raises(BundleError, match=reason):
        verify(BUNDLE)
    assert main(["bundle", "verify", str(BUNDLE)]) == 1
    assert reason in capsys.readouterr().err


def test_a_wrong_base_is_refused(project, capsys):
    model, tokenizer = load_base(Path("models/base"))
    with torch.no_grad():
        model.get_submodule("model.layers.0.feed_forward.down_proj").weight.add_(0.01)
    model.save_pretrained("other_base")
    tokenizer.save_pretrained("other_base")
    verify(BUNDLE)  # the files themselves are fine
    with pytest.raises(BundleError, match="made for base"):
        verify(BUNDLE, Path("other_base"))
    Path("other_models").mkdir()  # generate --bundle checks the base it loads, before anything else
    Path("other_base").rename("other_models/base")
    shutil.copytree("models/svd", "other_models/svd")
    assert main(["generate", "--bundle", str(BUNDLE), "--models", "other_models", "--prompt", "What is 2 + 2?"]) == 1
    assert "use the base the bundle was built on" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["../../models/experts/math.safetensors", 5])
def test_an_expert_entry_must_name_a_file_of_the_bundle(project, entry, capsys):
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    manifest["experts"]["math"] = entry
    (BUNDLE / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="experts not among the bundle's files: math"):
        verify(BUNDLE)


def test_a_bundle_needs_a_manifest(project, tmp_path):
    with pytest.raises(BundleError, match="not a bundle"):
        verify(tmp_path)
    save_file({"z": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "files": [], "experts": {}}')
    with pytest.raises(BundleError, match="missing or empty: name, version, base_fingerprint, files, experts, params"):
        verify(tmp_path)
    (tmp_path / "manifest.json").write_text("[1]")
    with pytest.raises(BundleError, match="not a JSON object"):
        verify(tmp_path)
