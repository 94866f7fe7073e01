"""The layout holds: dvc.yaml says what the stage modules declare, the schema's defaults are params.yaml's
values, arrows between packages run one way, and the CLI stays a loop of short functions."""

from __future__ import annotations

import ast
import collections
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from bayes_llm.config import Params
from bayes_llm.pipeline import ARTIFACT_ROOTS
from bayes_llm.stages import NAMES, all_stages
from tests.conftest import ROOT

LIBRARY = ROOT / "bayes_llm"


def _paths(entries: list) -> set[str]:
    """dvc.yaml deps/outs entries (strings, or one-key mappings with options) as paths."""
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_dvc_yaml_agrees_with_each_stage_module():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages = {stage.dvc_name: stage for stage in all_stages()}
    assert list(dvc) == list(NAMES) == list(stages)
    for name, stage in stages.items():
        entry = dvc[name].get("do", dvc[name])
        key = " ${key}" if "foreach" in dvc[name] else ""
        assert entry["cmd"] == f"python stages/{name}.py{key}"
        assert (ROOT / "stages" / f"{name}.py").is_file()
        deps, outs = stage.artifacts()
        assert {d for d in _paths(entry["deps"]) if d.startswith(ARTIFACT_ROOTS)} == deps, name
        written = _paths(entry.get("outs")) | _paths(entry.get("metrics")) | _paths(entry.get("plots"))
        assert written == outs, name
        # Every stage depends on its own module and the thin entry point that runs it.
        assert {f"stages/{name}.py", f"bayes_llm/stages/{name}.py"} <= _paths(entry["deps"])


def test_in_raw_is_where_dvc_sees_a_file_change(tmp_path, monkeypatch):
    """DVC hashes a linked file under data/raw by its content, does not walk a linked directory below
    it, and follows a linked data/raw itself."""
    from bayes_llm.paths import in_raw

    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere/dir").mkdir(parents=True)
    (tmp_path / "elsewhere/f.gguf").touch()
    (tmp_path / "data/raw/real").mkdir(parents=True)
    (tmp_path / "data/raw/linked.gguf").symlink_to(tmp_path / "elsewhere/f.gguf")
    (tmp_path / "data/raw/linked_dir").symlink_to(tmp_path / "elsewhere/dir")
    (tmp_path / "alias").symlink_to(tmp_path)
    assert in_raw("data/raw/real/x.gguf") and in_raw("data/raw/linked.gguf") and in_raw("./data/raw/real/../y")
    assert in_raw(tmp_path / "alias/data/raw/real/x.gguf") and in_raw("data/raw")
    assert not in_raw("data/raw/linked_dir") and not in_raw("data/raw/linked_dir/ckpt/model.gguf")
    assert not in_raw("elsewhere/f.gguf") and not in_raw("data/rawer/x")
    (tmp_path / "data/raw").rename(tmp_path / "raw_real")
    (tmp_path / "data/raw").symlink_to(tmp_path / "raw_real")
    assert in_raw("data/raw/real/x.gguf") and not in_raw("data/raw/linked_dir/model.gguf")


def test_code_deps_of_dvc_yaml_exist():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        for dep in _paths(stage.get("do", stage)["deps"]):
            if not dep.startswith(ARTIFACT_ROOTS):
                assert (ROOT / dep).exists(), f"{name}: {dep}"


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, typing.get_args(annotation))), None)


def _differences(schema: type[BaseModel], raw: dict, path: str = "") -> list[str]:
    """Keys of `raw` whose value is not the schema's default for them."""
    out = []
    for key, value in raw.items():
        field = schema.model_fields[key]
        is_map = typing.get_origin(field.annotation) is dict
        model = _model_in(typing.get_args(field.annotation)[1] if is_map else field.annotation)
        if model and isinstance(value, dict) and not is_map:
            out += _differences(model, value, f"{path}{key}.")
        elif model and is_map and value:
            # Per-entry maps (experts.<domain>): a value every entry shares must be the default.
            first, *rest = value.values()
            shared = {k: v for k, v in first.items() if all(k in e and e[k] == v for e in rest)}
            out += _differences(model, shared, f"{path}{key}.*.")
        elif field.default is not PydanticUndefined:
            default = field.default.model_dump(mode="json") if isinstance(field.default, BaseModel) else field.default
            if default != value:
                out.append(f"{path}{key}: schema {default!r}, params.yaml {value!r}")
    return out


def test_schema_defaults_are_params_yaml_values():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.pop("smoke"), raw.pop("real")
    assert _differences(Params, raw) == []


def test_the_defaults_check_catches_a_difference():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["pretrain"]["max_steps"] += 1
    raw["experts"] = {d: {**e, "val_items": 7} for d, e in raw["experts"].items()}
    assert len(_differences(Params, {k: raw[k] for k in ("pretrain", "experts")})) == 2


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n.startswith("bayes_llm.")}


def _top(module: str) -> str:
    return module.split(".")[1]


def test_arrows_run_one_way():
    edges = collections.defaultdict(set)
    for path in LIBRARY.rglob("*.py"):
        package = path.relative_to(LIBRARY).parts[0].removesuffix(".py")
        imported = {_top(m) for m in _imports(path)} - {package}
        if package not in ("stages", "cli", "__main__", "commands"):
            assert "stages" not in imported, f"{path}: a component imports a stage"
        edges[package] |= {m for m in imported if (LIBRARY / m).is_dir() or (LIBRARY / f"{m}.py").is_file()}
    both_ways = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    assert both_ways == []


def test_tools_live_outside_the_library():
    names = {p.stem for p in LIBRARY.rglob("*.py")}
    assert not {n for n in names if "benchmark" in n or n in ("kernel_check", "objective_study")}
    assert {"training_speed", "svf_cost", "kernel_check", "objective_study"} <= {
        p.stem for p in (ROOT / "benchmarks").glob("*.py")
    }


def test_cli_functions_are_short():
    for path in (LIBRARY / "cli.py", LIBRARY / "commands.py", LIBRARY / "command.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}:{node.name}"
