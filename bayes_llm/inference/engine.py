"""Two-pass inference: pass 1 scores the prompt's task, the controller turns that into a blend of
expert scales, pass 2 generates with the composed weights.

Composed weights are cached per blend (rounded weights as the key), so a batch of prompts that
route the same way pays the composition once; `generate` groups prompts by blend for that reason.
The empty blend is the base: its weights are restored exactly, never "whatever was loaded last".

Artifacts come from a models directory with `base/ svd/ experts/ dispatcher/`: the pipeline's
`models/` or a bundle with the same layout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bayes_llm.dispatch.controller import Controller
from bayes_llm.dispatch.fewshot import SearchResult, cem_search, layer_of, mixed_scales
from bayes_llm.dispatch.likelihood import label_logprobs
from bayes_llm.dispatch.store import DispatcherError, load_dispatcher
from bayes_llm.errors import UserError
from bayes_llm.experts.objectives import sft_batch
from bayes_llm.model.cloze import cloze_scores
from bayes_llm.model.greedy import greedy_completions
from bayes_llm.model.load import load_base
from bayes_llm.prompts import answer_prompt, model_context
from bayes_llm.rewards.correctness import correctness
from bayes_llm.svf.blend import BlendMode, blend_scales
from bayes_llm.svf.decompose import check_base, load_factors
from bayes_llm.svf.expert import load_expert
from bayes_llm.svf.scaling import Composer


@dataclass
class Answer:
    prompt: str
    text: str
    blend: dict[str, float]  # {} = base weights
    posterior: dict[str, float] = field(default_factory=dict)


BLEND_DECIMALS = 2  # weights differ by < 0.005 from the posterior's; confident prompts share one blend


def blend_key(blend: dict[str, float]) -> tuple:
    """The blend as a cache and grouping key. Rounded, so a batch whose posteriors are all ~1 for one
    expert runs as one group with one composition instead of one per prompt."""
    rounded = ((name, round(w, BLEND_DECIMALS)) for name, w in blend.items())
    return tuple(sorted((name, w) for name, w in rounded if w > 0))


class Engine:
    """Loads base, decomposition, experts and (if present) the dispatcher from one models directory."""

    def __init__(self, models: Path = Path("models"), cache_size: int = 8) -> None:
        models = Path(models)
        self.model, self.tokenizer = load_base(models / "base")
        self.factors, self.manifest = load_factors(models / "svd")
        check_base(self.model, self.manifest, models / "svd")
        files = sorted((models / "experts").glob("*.safetensors"))
        if not files:
            raise UserError(f"{models / 'experts'}: no expert files: run `dvc repro train_expert` first")
        experts = [load_expert(path, self.manifest) for path in files]
        self.expert_scales = {e.domain: e.scales(self.factors) for e in experts}
        self.composer = Composer(self.model, self.factors)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))  # tokens, answer included
        self.controllers: dict[str, Controller] = {}
        self.classifier_scales = None
        if (models / "dispatcher" / "dispatcher.json").is_file():
            controllers, classifier, meta = load_dispatcher(models / "dispatcher", self.manifest)
            if sorted(meta["domains"]) != sorted(self.expert_scales):
                raise DispatcherError(
                    f"{models / 'dispatcher'}: calibrated for experts {sorted(meta['domains'])}, found "
                    f"{sorted(self.expert_scales)}: run `dvc repro calibrate` again"
                )
            self.controllers, self.classifier_scales = controllers, classifier.scales(self.factors)
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._loaded: tuple | None = ()

    @property
    def domains(self) -> list[str]:
        return list(self.expert_scales)

    # --- weights -------------------------------------------------------------------------------

    def use_scales(self, key: tuple, scales_fn) -> None:
        """Load the composed weights for `key` (composing them with `scales_fn()` on a cache miss)."""
        if key == self._loaded:
            return
        if not key:
            self.composer.unmerge()
        else:
            if key not in self._cache:
                self._cache[key] = self.composer.compose(scales_fn())
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            self.composer.load(self._cache[key])
        self._loaded = key

    def clear_cache(self) -> None:
        """Forget composed weights (the loaded ones stay loaded)."""
        self._cache.clear()

    def use_blend(self, blend: dict[str, float]) -> None:
        unknown = set(blend) - set(self.expert_scales)
        if unknown:
            raise UserError(f"no expert for {', '.join(sorted(unknown))} (experts: {', '.join(self.domains)})")
        key = blend_key(blend)
        self.use_scales(key, lambda: blend_scales(self.expert_scales, dict(key)))

    # --- pass 1 --------------------------------------------------------------------------------

    def controller(self, strategy: str) -> Controller:
        if strategy not in self.controllers:
            raise DispatcherError(f"no calibrated controller for strategy {strategy!r}: run `dvc repro calibrate`")
        return self.controllers[strategy]

    def use_first_pass(self, strategy: str) -> None:
        """Load the weights pass 1 scores with: the classification expert (`cls`) or the base (`prompt`)."""
        if strategy == "cls":
            self.use_scales(("cls",), lambda: self.classifier_scales)
        else:
            self.use_blend({})

    def posterior(self, prompts: Sequence[str], strategy: str, batch_size: int = 32) -> torch.Tensor:
        """[n, domains + other] posterior of the first pass (`prompt`: base weights; `cls`: the
        classification expert)."""
        controller = self.controller(strategy)
        self.use_first_pass(strategy)
        logliks = label_logprobs(self.model, self.tokenizer, prompts, controller.labels, batch_size)
        return controller.posterior(logliks)

    def route(
        self, prompts: Sequence[str], strategy: str, mode: BlendMode = "weighted_average", top_k: int = 2
    ) -> list[tuple[dict[str, float], dict[str, float]]]:
        """(blend, posterior) per prompt."""
        if strategy == "base":
            return [({}, {}) for _ in prompts]
        if strategy.startswith("expert:"):
            domain = strategy.split(":", 1)[1]
            if domain not in self.expert_scales:
                raise UserError(f"no expert {domain!r} (experts: {', '.join(self.domains)})")
            return [({domain: 1.0}, {}) for _ in prompts]
        if strategy not in ("prompt", "cls"):
            raise UserError(f"unknown strategy {strategy!r}; strategies: prompt, cls, fewshot, base, expert:<domain>")
        controller = self.controller(strategy)
        posterior = self.posterior(prompts, strategy)
        return [
            (
                controller.blend(row, mode, top_k),
                {k: round(float(p), 4) for k, p in zip(controller.labels, row, strict=True)},
            )
            for row in posterior
        ]

    # --- pass 2 --------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        strategy: str = "prompt",
        mode: BlendMode = "weighted_average",
        top_k: int = 2,
        max_new_tokens: int = 64,
        batch_size: int = 32,
    ) -> list[Answer]:
        """Both passes; prompts are grouped by blend so each blend is composed and loaded once."""
        routes = self.route(prompts, strategy, mode, top_k)
        texts = self.complete_with(prompts, [blend for blend, _ in routes], max_new_tokens, batch_size)
        return [Answer(p, t, b, post) for p, t, (b, post) in zip(prompts, texts, routes, strict=True)]

    def complete_with(
        self, prompts: Sequence[str], blends: Sequence[dict[str, float]], max_new_tokens: int = 64,
        batch_size: int = 32,
    ) -> list[str]:  # fmt: skip
        """Greedy answers, each prompt with its own blend; grouped by blend so each is composed and
        loaded once."""
        texts: list[str] = [""] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, blend in enumerate(blends):
            groups.setdefault(blend_key(blend), []).append(i)
        for key, index in groups.items():
            self.use_blend(dict(key))
            for i, text in zip(index, self.complete([prompts[i] for i in index], max_new_tokens, batch_size),
                               strict=True):  # fmt: skip
                texts[i] = text
        return texts

    def refuse_overlong(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """A clear error for a prompt that leaves no room for its answer in the model's context, as the
        server gives; past the context a model answers garbage without a word."""
        for number, prompt in enumerate(prompts, 1):
            context = model_context(self.tokenizer, answer_prompt(prompt))
            used = len(self.tokenizer(context, add_special_tokens=False)["input_ids"])
            if used + max_new_tokens > self.context:
                raise UserError(f"prompt {number} is {used} tokens as the model is asked it: with {max_new_tokens} "
                                f"new tokens, more than the model's context of {self.context} tokens")  # fmt: skip

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
        """Greedy answers with the weights loaded now."""
        return greedy_completions(self.model, self.tokenizer, [answer_prompt(p) for p in prompts], max_new_tokens,
                                  batch_size)  # fmt: skip

    # --- few-shot ------------------------------------------------------------------------------

    @torch.no_grad()
    def _reference_loglik(self, rows: Sequence[dict]) -> float:
        batch = sft_batch(self.tokenizer, rows)
        return -float(self.model(**batch).loss)

    def fewshot(
        self,
        shots: Sequence[dict],
        kind: str,
        population: int,
        elites: int,
        iterations: int,
        seed: int,
        per_layer: bool = False,
        max_new_tokens: int = 64,
        cloze: bool = False,
    ) -> tuple[SearchResult, dict[str, torch.Tensor]]:
        """CEM over α on k examples (rows with prompt, answer, and tests/choices as the kind needs);
        returns the search result and the winning scales, now loaded as the current weights. `cloze`:
        the reward is the choice-text likelihood score (a task scored that way is searched by it)."""
        experts = self.domains
        layers = 1 + max(layer_of(name) for name in self.factors)
        shape = (len(experts), layers) if per_layer else (len(experts),)
        prompts = [row["prompt"] for row in shots]

        def score(alpha: np.ndarray) -> tuple[float, float]:
            key = ("fewshot", alpha.round(6).tobytes())
            self.use_scales(key, lambda: mixed_scales(alpha, self.expert_scales, per_layer))
            if cloze:
                reward = float(np.mean(cloze_scores(self.model, self.tokenizer, shots, batch_size=32)))
            else:
                reward = float(np.mean(correctness(kind, self.complete(prompts, max_new_tokens, len(prompts)), shots)))
            return reward, self._reference_loglik(shots)

        result = cem_search(score, shape, population, elites, iterations, seed)
        scales = mixed_scales(result.alpha, self.expert_scales, per_layer)
        self.use_scales(("fewshot-best", result.alpha.round(6).tobytes()), lambda: scales)
        return result, scales
