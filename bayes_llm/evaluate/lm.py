"""The lm-eval model `bayes-llm`: one evaluated system = which weights answer each request.

Modes:
  base                   the base weights
  expert:<domain>        one expert for every request
  oracle                 the expert of the request's own domain (the task's), base where it has none
  adaptive:prompt|cls    pass 1 (base or classification expert) → controller → blend, per prompt
  adaptive:fewshot       per task, a CEM search over expert mixtures on k of that task's examples
  lora                   per-domain LoRA adapters with oracle routing (the PEFT baseline)

lm-eval hands over all requests of one type at once. They are grouped by the weights they need;
each group's weights are composed and loaded once and the group runs batched through HFLM. Results
are memoized by (weights, request), so systems that share weights (an expert and the oracle on that
expert's domain) share the work when they share a `results` dict.

From lm-eval's own CLI (`bayes-llm lm-eval` registers the model first; run in the project root):
  bayes-llm lm-eval run --model bayes-llm --model_args mode=adaptive:prompt --tasks bayes_llm \
          --include_path bayes_llm/evaluate/tasks
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from bayes_llm import paths
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.evaluate import CHOICE_SUFFIX, WRITTEN_SUFFIX
from bayes_llm.inference.engine import Engine, blend_key
from bayes_llm.prompts import is_chat

TASK_PREFIX = "bayes_llm_"
Weights = tuple[tuple, Callable[[], None]]  # (key, load the weights)


def task_domain(task_name: str) -> str:
    """bayes_llm_reasoning, bayes_llm_reasoning_gen (the same items, answered in writing) and
    bayes_llm_reasoning_choice (scored by the choices' texts) → reasoning."""
    return task_name.removeprefix(TASK_PREFIX).removesuffix(WRITTEN_SUFFIX).removesuffix(CHOICE_SUFFIX)


def request_prompt(request) -> str:
    """The user's prompt for pass 1: the dataset row's `prompt`, else the whole context lm-eval built."""
    doc = request.doc if isinstance(request.doc, dict) else {}
    return str(doc.get("prompt") or request.args[0])


@register_model("bayes-llm")
class BayesLLM(HFLM):
    def __init__(
        self,
        models: str | Path = "models",
        mode: str = "base",
        engine: Engine | None = None,
        results: dict | None = None,
        fewshot: FewShotSearch | None = None,
        lora=None,
        blending_mode: str = "weighted_average",
        top_k: int = 2,
        batch_size: int = 32,
        **kwargs,
    ) -> None:
        self.engine = engine or Engine(Path(models))
        self.mode = mode
        self.results = {} if results is None else results
        self.fewshot = fewshot
        self.lora = lora
        self.blending_mode, self.top_k = blending_mode, int(top_k)
        self._check_mode()
        model = lora.model if mode == "lora" else self.engine.model
        tokenizer = self.engine.tokenizer
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size),
                         max_length=tokenizer.model_max_length, **kwargs)  # fmt: skip

    def _check_mode(self) -> None:
        kind, _, arg = self.mode.partition(":")
        valid = (
            (kind in ("base", "oracle") and not arg)
            or (kind == "expert" and arg in self.engine.domains)
            or (kind == "adaptive" and arg in ("prompt", "cls", "fewshot"))
            or (kind == "lora" and self.lora is not None)
        )
        if not valid:
            raise UserError(
                f"unknown system {self.mode!r}: base, oracle, expert:<{'|'.join(self.engine.domains)}>, "
                "adaptive:<prompt|cls|fewshot>, lora (with trained adapters)"
            )
        if self.mode == "adaptive:fewshot" and self.fewshot is None:
            raise UserError("adaptive:fewshot needs a few-shot searcher (the evaluate stage supplies one)")

    # --- which weights answer each request ---------------------------------------------------

    def _blend(self, blend: dict[str, float]) -> Weights:
        key = blend_key(blend)
        return key, lambda: self.engine.use_blend(dict(key))

    def _own_domain(self, request) -> dict[str, float]:
        domain = task_domain(request.task_name)
        return {domain: 1.0} if domain in self.engine.domains else {}

    def _weights(self, requests: Sequence) -> list[Weights]:
        kind, _, arg = self.mode.partition(":")
        if kind == "base":
            return [self._blend({})] * len(requests)
        if kind == "expert":
            return [self._blend({arg: 1.0})] * len(requests)
        if kind == "oracle":
            return [self._blend(self._own_domain(r)) for r in requests]
        if kind == "lora":
            return [self.lora.weights(task_domain(r.task_name)) for r in requests]
        if arg == "fewshot":
            by_task = {name: self.fewshot(name) for name in dict.fromkeys(r.task_name for r in requests)}
            return [by_task[r.task_name] for r in requests]
        prompts = list(dict.fromkeys(request_prompt(r) for r in requests))
        routes = self.engine.route(prompts, arg, self.blending_mode, self.top_k)  # pass 1, batched
        blends = {prompt: blend for prompt, (blend, _) in zip(prompts, routes, strict=True)}
        return [self._blend(blends[request_prompt(r)]) for r in requests]

    def _grouped(self, requests: list, request_type: str, run: Callable[[list], list]) -> list:
        plan = self._weights(requests)
        keys = [(weights, request_type, json.dumps(r.args, sort_keys=True, default=str))
                for (weights, _), r in zip(plan, requests, strict=True)]  # fmt: skip
        groups: dict[tuple, list[int]] = {}
        for index, (weights, _) in enumerate(plan):
            groups.setdefault(weights, []).append(index)
        for index in groups.values():
            todo = [i for i in index if keys[i] not in self.results]
            if todo:
                plan[index[0]][1]()  # load this group's weights once
                for i, result in zip(todo, run([requests[i] for i in todo]), strict=True):
                    self.results[keys[i]] = result
        return [self.results[key] for key in keys]

    # --- lm-eval's request types -----------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._grouped(requests, "generate_until", lambda group: HFLM.generate_until(self, group, True))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._grouped(requests, "loglikelihood", lambda group: HFLM.loglikelihood(self, group, True))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        run = lambda group: HFLM.loglikelihood_rolling(self, group, True)  # noqa: E731
        return self._grouped(requests, "loglikelihood_rolling", run)

    # --- our tokenizer adds no BOS itself; the base was trained with one (a chat template has its own) ----

    def _bos(self) -> str:
        return "" if is_chat(self.tokenizer) else self.tokenizer.bos_token or ""

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        return super().tok_encode(self._bos() + string, None, left_truncate_len, **kwargs)

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len=None,
                         truncation: bool = False):  # fmt: skip
        bos = self._bos()
        return super().tok_batch_encode([bos + s for s in strings], padding_side, left_truncate_len, truncation)


class FewShotSearch:
    """Per task (searched once, on first use): CEM over expert mixtures on `shots` rows of the domain's
    val split, or, for a test-only task, on the first `shots` rows of its test split (those rows stay
    in its score: disclosed in the report)."""

    def __init__(self, engine: Engine, shots: int, search: dict, seed: int, max_new_tokens: dict[str, int]) -> None:
        self.engine, self.shots, self.search, self.seed = engine, shots, search, seed
        self.max_new_tokens = max_new_tokens
        self.results: dict[str, dict] = {}  # task → {alpha per expert, reward, split}
        self._weights: dict[str, Weights] = {}

    def __call__(self, task_name: str) -> Weights:
        domain = task_domain(task_name)
        # One search per domain, whichever way its items are scored: a `choice_answer: text` domain's
        # written and choice-text columns both get the mixture ranked by its cloze score.
        if task_name.startswith(TASK_PREFIX):
            task_name = TASK_PREFIX + domain
        if task_name not in self._weights:
            infos = {d["name"]: d for d in prepared.domains()}
            if domain not in infos:
                raise UserError(f"{task_name}: few-shot search needs a prepared domain named {domain!r}")
            split = "test" if infos[domain]["test_only"] else "val"
            rows = prepared.read_split(paths.DATA, domain, split)[: self.shots]
            kind = infos[domain]["answer_kind"]
            # A seed per task: the same seed everywhere would draw the same candidate mixtures for
            # every task, so tasks with flat rewards would all return the same α.
            seed = self.seed + zlib.crc32(task_name.encode()) % 10_000
            result, scales = self.engine.fewshot(rows, kind, **self.search, seed=seed,
                                                 max_new_tokens=self.max_new_tokens[kind],
                                                 cloze=prepared.scored_by_choice_text(infos[domain]))  # fmt: skip
            alpha = np.asarray(result.alpha)
            key = ("fewshot", task_name, alpha.round(6).tobytes())
            self._weights[task_name] = (key, lambda: self.engine.use_scales(key, lambda: scales))
            per_expert = alpha.reshape(len(self.engine.domains), -1).mean(axis=1)
            self.results[task_name] = {
                "alpha": dict(zip(self.engine.domains, per_expert.round(4).tolist(), strict=True)),
                "reward": round(float(result.reward), 4),
                "shots": len(rows),
                "split": split,
            }
        return self._weights[task_name]
