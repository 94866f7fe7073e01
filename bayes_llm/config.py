"""The typed schema of `params.yaml`: its bounds, and defaults equal to the values params.yaml sets.

Every stage reads its params through `load_params`, which fails before any work with the key
path and what was expected. `profile: smoke` (or `real`) overlays the `smoke:` (`real:`) block of the
same file, so a tiny end-to-end run, or the real checkpoint on real benchmarks, needs no hand edit
(`dvc exp run -S profile=smoke`) and DVC still tracks it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bayes_llm import paths
from bayes_llm.errors import UserError

PARAMS_FILE = paths.PARAMS

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]


class ParamsError(UserError, ValueError):
    """Params that do not fit the schema; the message names every bad key path."""

    exit_code = 2


class Strict(BaseModel):
    # Unknown keys are typos until proven otherwise; no silent str -> int coercion.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SplitSizes(Strict):
    train: PositiveInt
    val: PositiveInt
    test: PositiveInt


class IntRange(Strict):
    min: NonNegativeInt
    max: NonNegativeInt

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class MathDomain(Strict):
    """Arithmetic: bare expressions and short multi-step word problems with a numeric answer."""

    sizes: SplitSizes
    operands: IntRange = IntRange(min=2, max=3)
    max_value: Annotated[int, Field(ge=2, le=10_000)] = 12
    ops: list[Literal["+", "-", "*"]] = Field(default=["+", "-"], min_length=1)
    # `*` draws its right operand from 2..mul_max so that products stay small.
    mul_max: Annotated[int, Field(ge=2, le=100)] = 9
    word_problem_share: Share = 0.3
    allow_negative: bool = False


class CodeDomain(Strict):
    """'Write a Python function that ...' from templates, with assert tests per item."""

    sizes: SplitSizes
    tests_per_item: Annotated[int, Field(ge=1, le=10)] = 3
    # Share of items that compose two steps (e.g. 'multiply by 3, then add 5').
    two_step_share: Share = 0.5


class ReasoningDomain(Strict):
    """Multiple choice: comparisons, ordering, simple syllogisms; the answer is a letter."""

    sizes: SplitSizes
    n_choices: Annotated[int, Field(ge=2, le=6)] = 4
    max_value: Annotated[int, Field(ge=10, le=10_000)] = 12
    list_length: IntRange = IntRange(min=3, max=5)


class TransferTask(Strict):
    """Test-only task mixing skills (arithmetic asked as multiple choice), for few-shot adaptation."""

    enabled: bool = True
    test: PositiveInt = 300
    n_choices: Annotated[int, Field(ge=2, le=6)] = 4
    max_value: Annotated[int, Field(ge=10, le=10_000)] = 12


class RoutingSizes(Strict):
    heldout: PositiveInt = 100  # per domain with an expert
    mixed: PositiveInt = 60  # per mixed kind (number problems asked as multiple choice / as a function)
    other: PositiveInt = 200  # off-domain prompts


class RoutingTrainSizes(Strict):
    heldout: PositiveInt = 400  # train prompts per domain, in the train part's wrappers
    other: PositiveInt = 400  # off-domain prompts from the train part's templates


class RoutingBenchmark(Strict):
    """The dispatcher's benchmark off the training distribution (bayes_llm/data/routing.py): `train`
    teaches the classification expert, `val` calibrates the controller, `test` reports on it."""

    enabled: bool = True
    train: RoutingTrainSizes = RoutingTrainSizes()
    val: RoutingSizes = RoutingSizes()
    test: RoutingSizes = RoutingSizes()


class SyntheticDomains(Strict):
    """The built-in generators; set one to null to leave that domain out."""

    math: MathDomain | None = None
    code: CodeDomain | None = None
    reasoning: ReasoningDomain | None = None


AnswerKind = Literal["number", "letter", "code"]
# How each synthetic domain answers, and each hub preset: a source named after a synthetic domain
# replaces it, and must answer the same way.
SYNTHETIC_KINDS: dict[str, str] = {"math": "number", "code": "code", "reasoning": "letter"}
PRESET_KINDS: dict[str, str] = {"gsm8k": "number", "mbpp": "code", "arc_easy": "letter"}
RESERVED_SUFFIXES = ("_loglik", "_gen", "_choice")


class FieldMap(Strict):
    """Which source column holds each row field (`None`: not in the source)."""

    prompt: str = "prompt"
    answer: str = "answer"
    id: str | None = None
    domain: str | None = None
    choices: str | None = None
    tests: str | None = None  # a list of asserts (MBPP's `test_list`) or one test (HumanEval's `test`)
    solution: str | None = None  # a worked solution ending '#### <answer>' (GSM8K's shape)
    # HumanEval's shape: `tests` holds `def check(candidate)`, called on the function this column names
    entry_point: str | None = None
    test_setup: str | None = None  # code run before each test (MBPP's `test_setup_code`)


class SplitFiles(Strict):
    train: str | None = None  # train and val: not for a test-only source
    val: str | None = None
    test: str


class SplitRows(Strict):
    """Rows to keep per split (null: all)."""

    train: PositiveInt | None = None
    val: PositiveInt | None = None
    test: PositiveInt | None = None


# At most this many rows of each split (the first ones), or a number per split.
MaxRows = PositiveInt | SplitRows | None


def split_cap(max_rows: MaxRows, split: str) -> int | None:
    return getattr(max_rows, split) if isinstance(max_rows, SplitRows) else max_rows


class LocalSource(Strict):
    """Local JSONL or parquet files, one per split."""

    type: Literal["local"]
    answer_kind: AnswerKind
    files: SplitFiles
    fields: FieldMap = FieldMap()
    max_rows: MaxRows = None  # after skip_ids
    # Rows left out by their `fields.id` value: items the data gate rightly refuses (e.g. MBPP's that pass
    # objects or exceed the time limit), so a real benchmark goes through without editing its files.
    skip_ids: list[str | int] = []
    # `field`: the answer column is the answer. `after_marker`: the answer is what follows the last
    # `answer_marker` in it (GSM8K: a worked solution ending '#### 1,234'), and the whole text becomes
    # the row's worked solution. Number answers drop thousands commas, `$` and a trailing period.
    answer_from: Literal["field", "after_marker"] = "field"
    answer_marker: str = Field("####", min_length=1)
    # Code: show the first N tests after the prompt, as MBPP's own prompt does (the task names no function).
    prompt_tests: NonNegativeInt = 0
    # Code: the answer column continues the prompt (HumanEval's `canonical_solution` is the body under
    # the prompt's signature), so the reference program is prompt + answer.
    answer_continues_prompt: bool = False
    # Only a test split (files.test): a task no expert or LoRA adapter trains for, answered by the adaptive
    # systems as they can (as the synthetic transfer task is).
    test_only: bool = False
    # Letter: how a multiple-choice answer is given. `letter`: the model writes the letter, and lm-eval
    # scores each letter's log-likelihood. `text`: the model writes the right choice's text (an expert
    # imitates it) and lm-eval scores each choice's text (per character, as its `arc_easy` does; the
    # expert's kept step is chosen by the same score on val): a small model picks letters at chance but
    # knows the answers' words.
    choice_answer: Literal["letter", "text"] = "letter"

    @model_validator(mode="after")
    def _splits(self) -> LocalSource:
        if self.choice_answer != "letter" and self.answer_kind != "letter":
            raise ValueError("choice_answer is for multiple choice (answer_kind: letter)")
        if self.skip_ids and self.fields.id is None:
            raise ValueError("skip_ids needs fields.id: the column the ids are read from")
        given = [split for split in ("train", "val") if getattr(self.files, split)]
        if self.test_only and given:
            raise ValueError(f"a test_only source reads files.test only; drop files.{', files.'.join(given)}")
        if self.test_only and isinstance(self.max_rows, SplitRows) and (self.max_rows.train or self.max_rows.val):
            raise ValueError("a test_only source has only a test split: max_rows takes `test` only")
        if not self.test_only and len(given) < 2:
            raise ValueError("files needs train, val and test (or test_only: true)")
        return self


class HubSource(Strict):
    """A Hugging Face hub dataset, through a preset or a split/field mapping (needs network)."""

    type: Literal["hub"]
    preset: Literal["gsm8k", "mbpp", "arc_easy"] | None = None
    path: str | None = None
    name: str | None = None
    answer_kind: AnswerKind | None = None
    # datasets split expressions, e.g. {train: "train[200:]", val: "train[:200]", test: "test"}.
    splits: SplitFiles | None = None
    fields: FieldMap = FieldMap()
    max_rows: MaxRows = None

    @model_validator(mode="after")
    def _preset_or_mapping(self) -> HubSource:
        if self.preset is None and not (self.path and self.splits and self.answer_kind):
            raise ValueError("give either `preset` or all of `path`, `splits` and `answer_kind`")
        if self.splits and not (self.splits.train and self.splits.val):
            raise ValueError("splits needs train, val and test")
        return self


Source = Annotated[LocalSource | HubSource, Field(discriminator="type")]


class PromptBounds(Strict):
    min_chars: PositiveInt = 8
    max_chars: PositiveInt = 2048


class DataParams(Strict):
    seed: NonNegativeInt = 1234
    domains: SyntheticDomains
    transfer: TransferTask = TransferTask()
    routing: RoutingBenchmark = RoutingBenchmark()
    # A name here replaces the synthetic domain of that name, or declares a new domain.
    sources: dict[str, Source] = {}
    prompt: PromptBounds = PromptBounds()
    # Rows a split of an external source must have at least (synthetic splits must match `sizes`).
    min_rows: PositiveInt = 1

    @field_validator("sources")
    @classmethod
    def _names(cls, sources: dict[str, Source]) -> dict[str, Source]:
        for name, source in sources.items():
            # `other` is the dispatcher's label for "no expert"; the suffixes name evaluate's columns and
            # lm-eval tasks of a letter domain (stages/evaluate.py)
            if not name.isidentifier() or name in ("transfer", "other") or name.endswith(RESERVED_SUFFIXES):
                raise ValueError(f"source name {name!r} must be an identifier other than 'transfer' and 'other', "
                                 f"not ending in {', '.join(RESERVED_SUFFIXES)}")  # fmt: skip
            kind = PRESET_KINDS[source.preset] if getattr(source, "preset", None) else source.answer_kind  # as loaded
            if name in SYNTHETIC_KINDS and kind != SYNTHETIC_KINDS[name]:
                raise ValueError(f"source {name!r} answers by {kind}, the synthetic {name!r} it replaces by "
                                 f"{SYNTHETIC_KINDS[name]} (its shipped test task scores that): give the source "
                                 "another name")  # fmt: skip
        return sources


class MambaParams(Strict):
    d_state: Annotated[int, Field(ge=1, le=256)] = 16
    d_conv: Annotated[int, Field(ge=2, le=8)] = 4
    expand: Annotated[int, Field(ge=1, le=4)] = 2
    # Mamba-2 (bamba) only: heads over the expanded width; `expand * hidden_size` must divide by it.
    heads: PositiveInt = 8
    chunk_size: PositiveInt = 64


class ModelParams(Strict):
    """The base: `scratch` pretrains a MambaFormer; anything else is a local dir or hub id to load."""

    source: str = "scratch"
    # bamba: Mamba-2 blocks (fast on CPU); jamba: Mamba-1 blocks (the paper's), with a linear-time
    # CPU scan when mamba-ssm is absent.
    family: Literal["bamba", "jamba"] = "bamba"
    hidden_size: Annotated[int, Field(ge=8, le=8192)] = 256
    layers: Annotated[int, Field(ge=1, le=128)] = 4
    attention_heads: PositiveInt = 4
    kv_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 512
    # Attention layer indices; null = the MambaFormer layout: Mamba first, then alternating
    # (attention at 1, 3, 5, ...).
    attention_layers: list[NonNegativeInt] | None = None
    mamba: MambaParams = MambaParams()
    max_length: Annotated[int, Field(ge=16, le=1 << 20)] = 512

    @model_validator(mode="after")
    def _shapes(self) -> ModelParams:
        if self.hidden_size % self.attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by attention_heads ({self.attention_heads})"
            )
        if self.attention_heads % self.kv_heads:
            raise ValueError(f"attention_heads ({self.attention_heads}) must divide by kv_heads ({self.kv_heads})")
        if self.family == "bamba" and (self.mamba.expand * self.hidden_size) % self.mamba.heads:
            raise ValueError(f"mamba.expand * hidden_size must divide by mamba.heads ({self.mamba.heads})")
        if self.attention_layers and max(self.attention_layers) >= self.layers:
            raise ValueError(f"attention_layers must be < layers ({self.layers})")
        return self


class TokenizerParams(Strict):
    vocab_size: Annotated[int, Field(ge=260, le=1 << 18)] = 1024


class PretrainParams(Strict):
    """Causal-LM pretraining of a `scratch` base on the mixture of all train splits."""

    seq_len: Annotated[int, Field(ge=8, le=1 << 16)] = 128
    batch_size: PositiveInt = 16
    max_steps: PositiveInt = 1000
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 3e-3
    warmup_steps: NonNegativeInt = 50
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    eval_every: PositiveInt = 100
    # Each train prompt also appears, with this probability, as 'Task: <prompt> / Domain: <label>'
    # so that the base can classify prompts in the first pass.
    classify_share: Share = 0.2
    # Rows with a worked solution show it (instead of the bare answer) with this probability, so the
    # base knows both formats and does not reliably pick the better one: room for the experts.
    solution_share: Share = 0.5
    # Oversampling per domain (2.5: every row twice, half of them a third time); unlisted: 1.
    domain_weights: dict[str, Annotated[float, Field(gt=0, le=100)]] = {}


class BaseEvalParams(Strict):
    """Greedy exact match of the base on each domain's val split (reports/base/metrics.json)."""

    max_items: PositiveInt = 300
    batch_size: PositiveInt = 32
    max_new_tokens: dict[Literal["number", "letter", "code"], PositiveInt] = {"number": 32, "letter": 64, "code": 64}


class SVFParams(Strict):
    """Singular-value fine-tuning: which matrices the experts adapt and how z scales them."""

    # A preset (mlp: the official choice, attn, mamba, all) or regular expressions over module names.
    targets: Literal["mlp", "attn", "mamba", "all"] | Annotated[list[str], Field(min_length=1)] = "all"
    # scale: W' = U diag(σ·z) Vᵀ, z starts at 1. official: z = sigmoid(p)·max_mult, Σσ kept (Transformer²).
    mode: Literal["scale", "official"] = "scale"
    max_mult: Annotated[float, Field(gt=1.0, le=100.0)] = 2.0


class ExpertParams(Strict):
    """One domain's expert: how its z is trained (see bayes_llm.experts)."""

    # sft: next-token training of z on the reference answers (the paper's baseline). rl: RL on a
    # correctness reward. sft+rl: SFT warm start, then RL from the best SFT z.
    objective: Literal["sft", "rl", "sft+rl"] = "sft+rl"
    sft_steps: NonNegativeInt = 60
    sft_learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-2
    sft_batch_size: PositiveInt = 32
    # Loss truncation: this share of each SFT batch, the sequences with the highest loss, is left out
    # of the update (see objectives.sft_loss).
    sft_drop_hardest: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # reinforce: Transformer²'s own (greedy rollouts at temperature 0, ±1 reward, no baseline unless
    # `baseline`; with a temperature and `baseline` it is a group-relative policy gradient).
    # grpo, rloo: trl's GRPOTrainer / RLOOTrainer on z (sampled groups of num_generations ≥ 2).
    rl_algorithm: Literal["reinforce", "grpo", "rloo"] = "reinforce"
    rl_steps: NonNegativeInt = 40
    rl_learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-3
    rl_batch_size: PositiveInt = 16
    num_generations: PositiveInt = 1  # completions per prompt (sampled when temperature > 0)
    temperature: Annotated[float, Field(ge=0, le=5)] = 0.0  # 0: greedy rollouts
    baseline: bool = False  # reinforce: subtract the mean reward of the prompt's group
    beta: Annotated[float, Field(ge=0, le=10)] = 0.0  # KL toward the base
    max_new_tokens: PositiveInt = 8
    eval_every: PositiveInt = 20
    val_items: PositiveInt = 150
    checkpoint_every: PositiveInt = 50
    eval_batch_size: PositiveInt = 64
    # bf16: the training forward and backward run under CPU/GPU autocast (matmuls in bfloat16, z and
    # its optimizer in float32): 1.6-1.9x faster steps on a CPU with AVX512-BF16. Validation, the reports
    # and inference stay float32. Without native bf16 (an AVX2 CPU) it trains in fp32 (Trainer).
    train_precision: Literal["fp32", "bf16"] = "fp32"
    # RL's headroom in the report: pass@1 (greedy) and pass@k of the base and the SFT z on val, k samples
    # at `headroom_temperature` (null: the RL temperature, or 1.0 where RL rolls out greedily). 0: skip.
    headroom_k: NonNegativeInt = 8
    headroom_temperature: Annotated[float, Field(gt=0, le=5)] | None = None

    @property
    def headroom_sampling_temperature(self) -> float:
        """What the headroom samples at: `headroom_temperature`, else the RL temperature, else 1.0."""
        return self.headroom_temperature or self.temperature or 1.0

    @model_validator(mode="after")
    def _steps(self) -> ExpertParams:
        if "sft" in self.objective and self.sft_steps == 0:
            raise ValueError(f"objective {self.objective} needs sft_steps > 0")
        if "rl" in self.objective and self.rl_steps == 0:
            raise ValueError(f"objective {self.objective} needs rl_steps > 0")
        if self.temperature == 0 and self.num_generations > 1:
            raise ValueError("greedy rollouts (temperature 0) are all the same: use num_generations 1")
        if self.baseline and self.rl_algorithm == "reinforce" and self.num_generations < 2:
            raise ValueError("baseline subtracts the mean reward of the prompt's group: with num_generations 1 "
                             "every advantage is 0 (set num_generations >= 2 and temperature > 0)")  # fmt: skip
        if self.rl_algorithm != "reinforce" and (self.num_generations < 2 or self.temperature == 0):
            raise ValueError(
                f"rl_algorithm {self.rl_algorithm} compares sampled completions of one prompt: "
                "set num_generations >= 2 and temperature > 0"
            )
        return self


class ClassifierParams(Strict):
    """The classification expert: SFT of z on 'Task: <prompt> / Domain: <label>' from train splits (and
    the routing benchmark's train part: other wrappers, off-domain prompts labelled `other`)."""

    steps: PositiveInt = 400
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-2
    batch_size: PositiveInt = 32


class FewShotParams(Strict):
    """Few-shot CEM over expert mixing weights α (see bayes_llm.dispatch.fewshot)."""

    shots: PositiveInt = 8
    population: PositiveInt = 8
    elites: PositiveInt = 3
    iterations: PositiveInt = 4
    per_layer: bool = False  # one α per expert and layer instead of per expert
    max_new_tokens: PositiveInt = 32

    @model_validator(mode="after")
    def _elites(self) -> FewShotParams:
        if self.elites > self.population:
            raise ValueError(f"elites ({self.elites}) must be <= population ({self.population})")
        return self


class DistributedParams(Strict):
    """Data-parallel expert training (bayes_llm.experts.distributed): `processes` > 1 runs
    `train_expert` under `accelerate launch`, each process on its share of every global batch."""

    processes: Annotated[int, Field(ge=1, le=1024)] = 1
    # gloo: CPU processes. NCCL (a GPU per process) waits for the trainer's GPU path: experts train
    # on the CPU today.
    backend: Literal["gloo"] = "gloo"
    # null: each process computes its share of a batch and the gradients are all-reduced, the same z as
    # one process up to float rounding. S: every batch is cut into S fixed shares, whatever the number
    # of processes (one included), their gradients added in share order: the same z bit for bit for
    # any processes <= S (and sampled rollouts too), at the price of S smaller passes per step.
    shares: Annotated[int, Field(ge=1, le=1024)] | None = None


class DispatchParams(Strict):
    """First pass, Bayesian controller and its calibration (the `calibrate` stage)."""

    # The default first pass of `generate`, `serve` and the bundle. `cls`: the only one that can say
    # `other` (the base never saw that label); measured on the routing benchmark, reports/dispatch.
    strategy: Literal["prompt", "cls"] = "cls"
    prior: Literal["uniform", "data"] = "uniform"  # data: domains in proportion to their train rows
    blending_mode: Literal["weighted_average", "top_k", "max"] = "weighted_average"
    top_k: PositiveInt = 2
    # The threshold below which the base answers is set so that at most this share of in-domain
    # val prompts falls back to it.
    max_fallback: Share = 0.01
    # With off-domain prompts in the routing benchmark's val part, the threshold is instead the one
    # with the best `other` recall at this precision or better (max_fallback when none reaches it).
    other_precision: Share = 0.9
    batch_size: PositiveInt = 32
    classifier: ClassifierParams = ClassifierParams()
    fewshot: FewShotParams = FewShotParams()
    timing_prompts: PositiveInt = 16  # prompts timed for pass 1 / composition / pass 2
    timing_new_tokens: PositiveInt = 64


class LoraParams(Strict):
    """The LoRA baseline (`train_lora` stage): one adapter per expert domain, the experts' SFT objective."""

    rank: PositiveInt = 16
    alpha: PositiveInt = 32
    targets: list[str] = Field(default=["q_proj", "v_proj"], min_length=1)  # module names (the paper: q, v)
    steps: PositiveInt = 100
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 2e-3
    batch_size: PositiveInt = 32


SYSTEMS = ("base", "expert:*", "oracle", "adaptive:prompt", "adaptive:cls", "adaptive:fewshot", "lora")


class EvaluateParams(Strict):
    """The `evaluate` stage: every system on every domain's test split through lm-eval."""

    # expert:* expands to one row per expert; expert:<domain> names one.
    systems: list[str] = Field(default=list(SYSTEMS), min_length=1)
    batch_size: PositiveInt = 32
    bootstrap_resamples: PositiveInt = 2000  # paired bootstrap CIs of each system's gain over the base
    # domain → lm-eval task. Empty: the shipped `bayes_llm_<domain>` tasks on data/prepared. For real
    # checkpoints with hub access, e.g. {math: gsm8k, code: mbpp, reasoning: arc_easy}.
    tasks: dict[str, str] = {}
    # Tokens every generated answer may take, for all generative tasks (lm-eval's gen_kwargs); None:
    # each task's own (32 for numbers, 64 for code and written letters). A quick check sets it low.
    max_gen_toks: PositiveInt | None = None
    lora: LoraParams = LoraParams()

    @field_validator("systems")
    @classmethod
    def _systems(cls, systems: list[str]) -> list[str]:
        known = {s for s in SYSTEMS if s != "expert:*"}
        bad = [s for s in systems if s not in known and not (s.startswith("expert:") and len(s) > len("expert:"))]
        if bad:
            raise ValueError(f"unknown systems {bad}; systems: {', '.join(SYSTEMS)}, expert:<domain>")
        if len(set(systems)) != len(systems):
            raise ValueError("each system once")
        return systems


class BundleParams(Strict):
    """The `bundle` stage: bundles/<name>/ with the experts, the dispatcher, a manifest and a model card."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")] = "bayes-llm-experts"
    version: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")] = "0.1.0"


class SandboxParams(Strict):
    """Where model-written code runs (bayes_llm.rewards.sandbox)."""

    # The sandbox refuses to run untrusted code without at least a uid of its own and rlimits (that needs
    # root: CI, containers). true: run it anyway with whatever layers the machine gives, said once on stderr.
    allow_weak_isolation: bool = False


class Params(Strict):
    seed: NonNegativeInt = 0
    profile: Literal["full", "smoke", "real"] = "full"
    # The overlays applied when profile is "smoke" or "real"; validated as part of the merged result.
    smoke: dict[str, Any] = {}
    real: dict[str, Any] = {}
    data: DataParams
    model: ModelParams = ModelParams()
    tokenizer: TokenizerParams = TokenizerParams()
    pretrain: PretrainParams = PretrainParams()
    base_eval: BaseEvalParams = BaseEvalParams()
    svf: SVFParams = SVFParams()
    # One expert per listed domain (a domain of `data` without an entry gets none).
    experts: dict[str, ExpertParams] = {}
    distributed: DistributedParams = DistributedParams()
    dispatch: DispatchParams = DispatchParams()
    evaluate: EvaluateParams = EvaluateParams()
    bundle: BundleParams = BundleParams()
    sandbox: SandboxParams = SandboxParams()

    @model_validator(mode="after")
    def _experts_train(self) -> Params:
        for domain in self.experts:
            if getattr(self.data.sources.get(domain), "test_only", False):
                raise ValueError(f"experts.{domain}: data.sources.{domain} is test_only: no train split to train on")
        return self

    @model_validator(mode="after")
    def _shardable(self) -> Params:
        """Every process needs rows of every batch; trl's trainers run their own accelerate."""
        n, shares = self.distributed.processes, self.distributed.shares
        if shares is not None and shares < n:
            raise ValueError(f"distributed.shares ({shares}) < distributed.processes ({n}): a process would get "
                             "no share of a batch")  # fmt: skip
        least = [("processes", n, "a process")] + ([("shares", shares, "a share")] if shares is not None else [])
        for domain, cfg in self.experts.items():
            for key in ("sft_batch_size", "rl_batch_size", "val_items"):
                have = getattr(cfg, key)
                for name, count, who in least:
                    if have < count:
                        raise ValueError(f"experts.{domain}.{key} ({have}) < distributed.{name} ({count}): "
                                         f"{who} would get no rows")  # fmt: skip
            if n > 1 and "rl" in cfg.objective and cfg.rl_algorithm != "reinforce":
                raise ValueError(
                    f"experts.{domain}: distributed.processes > 1 trains rl_algorithm reinforce only "
                    f"(got {cfg.rl_algorithm}; trl's trainers are launched on their own)"
                )
        return self


OVERLAID_PROFILES = ("smoke", "real")


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validation_problems(error: ValidationError) -> str:
    """A schema error on one line: each bad key path with its message (a check on the whole model: the
    message alone)."""
    problems = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {message}" if path else message)
    return "; ".join(problems)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid param(s):"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        # Union members show up as extra loc parts ('local', 'hub'); keep them: they say which shape.
        # A check across the top-level keys has all the params as its input: its message names the keys.
        whole_params = not item["loc"] and item["type"] == "value_error"
        shown = item["type"] not in ("missing", "extra_forbidden") and not whole_params
        got = f" (got {item['input']!r})" if shown else ""
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"  {path or '<root>'}: {message}{got}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a params mapping, applying the profile's overlay when `profile` is smoke or real."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    profile = raw.get("profile")
    if profile in OVERLAID_PROFILES:
        if profile not in raw:  # else it would quietly run the full sizes
            raise ParamsError(f"{source}: profile {profile!r} needs its `{profile}:` block (the overlay it applies)")
        overlay = raw.get(profile) or {}
        if not isinstance(overlay, dict):
            raise ParamsError(f"{source}: {profile}: expected a mapping, got {type(overlay).__name__}")
        raw = _deep_merge(raw, overlay)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_format_errors(error, source)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))
