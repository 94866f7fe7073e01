from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bayes_llm.data.prepared import PreparedDataError
from bayes_llm.stages.base import build_base
from bayes_llm.stages.prepare import prepare
from tests.conftest import smoke_params
from tests.tiny_models import save_tiny_checkpoint

DETERMINISTIC = ("parameters", "train_tokens", "final_train_loss", "final_val_loss", "val_accuracy", "vocab_size")


@pytest.fixture
def prepared(workdir):
    params = smoke_params()
    prepare(params, progress=False)
    return params


def test_scratch_base_is_saved_measured_and_reproducible(prepared):
    metrics = build_base(prepared, progress=False)
    assert metrics["model_type"] == "bamba" and metrics["parameters"] > 0
    assert set(metrics["val_accuracy"]) == {"math", "code", "reasoning"}
    assert metrics["train_tokens"] == 4 * 4 * 64 and metrics["train_tokens_per_second"] > 0
    written = json.loads(Path("reports/base/metrics.json").read_text())
    timing = json.loads(Path("reports/base/timing.json").read_text())
    assert set(timing) == {"stage_seconds", "train_seconds", "train_tokens_per_second"}
    assert written | timing == metrics  # seconds in the timing file, never among the metrics
    for name in ("train_loss.csv", "val_loss.csv", "loss.png", "val_examples.json"):
        assert (Path("reports/base") / name).stat().st_size > 0
    assert Path("reports/base/val_loss.csv").read_text().splitlines()[0] == "step,loss"

    model = AutoModelForCausalLM.from_pretrained("models/base")
    tokenizer = AutoTokenizer.from_pretrained("models/base")
    assert model.config.mambaformer["attention_layers"] == [1]
    assert tokenizer.padding_side == "left" and len(tokenizer) == model.config.vocab_size

    again = build_base(prepared, progress=False)
    assert {k: again[k] for k in DETERMINISTIC} == {k: metrics[k] for k in DETERMINISTIC}


def test_checkpoint_source_skips_pretraining(prepared, workdir):
    source = save_tiny_checkpoint("jamba", workdir / "ckpt")
    params = prepared.model_copy(update={"model": prepared.model.model_copy(update={"source": str(source)})})
    metrics = build_base(params, progress=False)
    assert metrics["model_type"] == "jamba" and metrics["train_seconds"] == 0.0
    assert AutoModelForCausalLM.from_pretrained("models/base").config.model_type == "jamba"
    # not pretrained here: empty curves, which DVC's declared outputs still need
    assert Path("reports/base/loss.png").is_file()
    assert [Path(f"reports/base/{c}_loss.csv").read_text().split() for c in ("train", "val")] == [["step,loss"]] * 2


def test_missing_prepared_data_is_a_clear_error(workdir):
    with pytest.raises(PreparedDataError, match=r"dvc repro prepare"):
        build_base(smoke_params(), progress=False)
    assert not Path("models/base").exists()


def test_corrupt_prepared_manifest_is_a_clear_error(prepared):
    for text in ("{truncated", "[]", '{"rows": 3}'):
        Path("data/prepared/domains.json").write_text(text)
        with pytest.raises(PreparedDataError, match=r"domains\.json: .*run `dvc repro prepare`"):
            build_base(prepared, progress=False)
    assert not Path("models/base").exists()


def test_corrupt_prepared_split_is_a_clear_error(prepared):
    Path("data/prepared/math/val.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(PreparedDataError, match=r"math/val\.parquet: cannot read it .*dvc checkout"):
        build_base(prepared, progress=False)
    assert not Path("models/base").exists()


def test_a_local_checkpoint_outside_data_raw_gets_a_note(prepared, workdir, capsys):
    """data/raw/ is what `dvc repro` watches for base: a checkpoint elsewhere can change unseen."""
    import yaml

    from bayes_llm.cli import main
    from bayes_llm.stages.base import unwatched_checkpoint
    from tests.conftest import raw_params

    outside = save_tiny_checkpoint("jamba", workdir / "ckpt")
    inside = save_tiny_checkpoint("jamba", workdir / "data/raw/ckpt")
    assert unwatched_checkpoint(str(outside)) == outside
    assert unwatched_checkpoint("data/raw/ckpt") is None and unwatched_checkpoint(str(inside)) is None
    assert unwatched_checkpoint("scratch") is None and unwatched_checkpoint("HuggingFaceTB/SmolLM2-135M") is None
    (workdir / "data/raw/linked").symlink_to(outside)  # DVC does not walk a linked directory
    assert unwatched_checkpoint("data/raw/linked") == Path("data/raw/linked")

    for source, noted in ((str(outside), True), ("data/raw/ckpt", False)):
        raw = raw_params()
        raw["model"] = {**raw.get("model", {}), "source": source}
        Path("params.yaml").write_text(yaml.safe_dump(raw))
        assert main(["base", "--quiet"]) == 0
        err = capsys.readouterr().err
        assert ("lies outside data/raw/, the directory `dvc repro` watches" in err) is noted, err
