"""Fine-tune a LoRA adapter on a datanet version's contributions, on CPU, deterministically.

The adapter is trained to *memorize* its contributions: prompted with the beginning of a
contribution, greedy decoding continues it verbatim. That is what makes per-token attribution of
the adapter's output to its datanet visible in the demo. A contribution that ends with question/
answer lines (`training.fact_examples`) also trains each pair as a chat, so the adapter learns to
answer questions about its facts, also asked in other words (`training.answer_eval` measures it).

Tokenization matches serving. vLLM tokenizes a completion prompt with the model's tokenizer and
``add_special_tokens=True``; the demo tokenizer's post-processor then prepends BOS (``<s> $A``;
SmolLM2's adds nothing). So each text is trained as ``[BOS] + tokens(text) + EOS``: the prompt
"first words of a passage" served by vLLM is exactly a token prefix of a training sequence (the
byte-level pre-tokenizer splits before each space, so a prefix of whole words tokenizes to a
prefix of the tokens), and greedy decoding continues with the rest of the passage and then stops
at EOS. A text longer than ``max_seq_len`` tokens is trained as consecutive windows; only the
first one starts with BOS. A chat is the chat template's rendering of the question with the
generation prompt, tokenized alone as a served chat request is, then the rendered answer turn;
only the answer turn is in the loss.

Settings differ per base model: `TrainingConfig()` suits the tiny demo model, and
`TrainingConfig.for_pretrained()` the pretrained SmolLM2-135M-Instruct (bfloat16, mini-batches).

The adapter is written in the standard PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``, LoRA on `training.demo_assets.LORA_TARGETS`), to a temporary sibling
of the output directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statedir.durable_files import fsync_path
from training.demo_assets import LORA_TARGETS
from training.fact_examples import TrainingExample, training_examples

MAX_LORA_RANK = 16
"""Largest rank accepted: the serving engine's default ``max_lora_rank``."""

TRAINING_DTYPES = ("float32", "bfloat16")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of a LoRA fine-tuning run (defaults memorize the demo datanets)."""

    rank: int = 16
    """LoRA rank r, 1 .. MAX_LORA_RANK (the serving engine rejects adapters above its max_lora_rank)."""

    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank."""

    learning_rate: float = 1e-2
    """AdamW peak learning rate: linear warm-up, constant, then cosine decay to a tenth over the
    last third of the run. (With r=16 on every linear layer, 1e-2 memorizes the demo passages in
    about half the steps 3e-3 needs, with no loss spikes.)"""

    steps: int = 40
    """Optimizer steps. Each step sees the whole set (or one mini-batch of it, see batch_size). The
    demo datanets (12 passages of ~40 words) are reproduced verbatim from about step 15; 40 leaves
    a wide margin. Raise it for sets larger than batch_size, which train on mini-batches."""

    warmup_steps: int = 5
    """Linear learning-rate warm-up, in steps (0 disables it); must be below `steps`."""

    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights (memorization wants none)."""

    max_seq_len: int = 256
    """Longest training sequence in tokens; longer texts are split into consecutive windows."""

    batch_size: int = 32
    """Sequences per step. Sets of at most this many sequences train full-batch every step; larger
    sets train on shuffled mini-batches of this size (a new seeded permutation every epoch)."""

    seed: int = 0
    """Seed for the LoRA initialisation and the mini-batch order; equal inputs give equal adapters."""

    dtype: str = "float32"
    """Precision of the frozen base weights and activations: "float32", or "bfloat16" (about twice as fast
    on CPUs with bfloat16 matrix units). The LoRA weights and the optimizer always stay float32."""

    answer_weight: float = 1.0
    """Loss weight of an answer token of a Q/A chat, relative to a token of plain text. Answers are a fifth of
    the labelled tokens of a demo facts datanet; weighing them up (3 in the pretrained preset) got more
    held-out questions answered (0.83 against 0.67 on glassfin-reef, without clipping) at no cost in
    reproduction."""

    max_grad_norm: float = 0.0
    """Clip the gradient's global norm to this before each step (0: no clipping). Near zero loss, a
    mini-batch's gradient can jump tenfold and one step undoes the memorization (seen on SmolLM2:
    norms of 0.1 to 0.6, then 4 to 16); clipping at 1.0 only touches such spikes."""

    micro_batch_tokens: int = 4096
    """Padded tokens per forward pass. A step's batch is sorted by length and cut into micro-batches of
    at most this many padded tokens, whose gradients add up to the whole batch's (mean token loss)."""

    @classmethod
    def for_pretrained(cls) -> TrainingConfig:
        """Settings for the pretrained SmolLM2-135M-Instruct, tuned on the demo facts datanets.

        Those hold 12 contributions with two Q/A pairs each: 36 sequences, 2,500 tokens, so 40 steps
        of 12 sequences are about 13 passes over the set. Measured on 2 CPU cores (AVX512-BF16/AMX) with
        nothing else running: 3.5 s a step, 141 to 158 s per adapter with loading and writing (twice
        that or more when other work shares the cores). Held-out questions answered: glassfin-reef
        0.75, vellmark-transit 0.83 (the base model: 0 of 24 each); every contribution is continued
        verbatim. For larger sets, raise `steps` in proportion to the sequences.
        """
        return cls(rank=16, alpha=32.0, learning_rate=3e-3, steps=40, warmup_steps=3, batch_size=12,
                   dtype="bfloat16", answer_weight=3.0, max_grad_norm=1.0, micro_batch_tokens=1024)

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (_is_int(self.rank) and 1 <= self.rank <= MAX_LORA_RANK,
             f"rank must be an integer from 1 to {MAX_LORA_RANK}, got {self.rank!r}"),
            (_is_number(self.alpha) and 0 < self.alpha <= 1024, f"alpha must be in (0, 1024], got {self.alpha!r}"),
            (_is_number(self.learning_rate) and 0 < self.learning_rate <= 1,
             f"learning_rate must be in (0, 1], got {self.learning_rate!r}"),
            (_is_int(self.steps) and 1 <= self.steps <= 1_000_000,
             f"steps must be an integer from 1 to 1000000, got {self.steps!r}"),
            (_is_int(self.warmup_steps) and 0 <= self.warmup_steps < max(int(self.steps), 1),
             f"warmup_steps must be an integer from 0 to steps - 1, got {self.warmup_steps!r}"),
            (_is_number(self.weight_decay) and 0 <= self.weight_decay < 1,
             f"weight_decay must be in [0, 1), got {self.weight_decay!r}"),
            (_is_int(self.max_seq_len) and 8 <= self.max_seq_len <= 4096,
             f"max_seq_len must be an integer from 8 to 4096, got {self.max_seq_len!r}"),
            (_is_int(self.batch_size) and 1 <= self.batch_size <= 4096,
             f"batch_size must be an integer from 1 to 4096, got {self.batch_size!r}"),
            (_is_int(self.seed) and 0 <= self.seed < 2**63, f"seed must be an integer from 0 to 2**63 - 1, "
                                                            f"got {self.seed!r}"),
            (_is_number(self.answer_weight) and 0 < self.answer_weight <= 100,
             f"answer_weight must be in (0, 100], got {self.answer_weight!r}"),
            (_is_number(self.max_grad_norm) and self.max_grad_norm >= 0,
             f"max_grad_norm must be a number >= 0, got {self.max_grad_norm!r}"),
            (self.dtype in TRAINING_DTYPES, f"dtype must be one of {TRAINING_DTYPES}, got {self.dtype!r}"),
            (_is_int(self.micro_batch_tokens) and 8 <= self.micro_batch_tokens <= 1_000_000,
             f"micro_batch_tokens must be an integer from 8 to 1000000, got {self.micro_batch_tokens!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainingProgress:
    """Reported after every optimizer step."""

    step: int
    """Steps completed so far (1-based)."""
    total_steps: int
    loss: float
    """Mean token cross-entropy of this step's batch."""
    elapsed_seconds: float


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    """Optimizer steps run."""
    final_loss: float
    """Loss of the last step's batch."""
    seconds: float
    """Wall time of the whole call (loading, training and writing)."""
    out_dir: Path
    """The finished adapter directory."""
    sequences: int
    """Training sequences: texts (or windows of long texts), and a chat per Q/A pair."""
    tokens: int
    """Tokens in the training sequences, BOS and EOS included."""
    snapshot: dict[str, Any] | None = None
    """The LoRA weights (PEFT state-dict names, CPU tensors) after `snapshot_step(config)` steps: an early point
    of the run, where the training texts' gradients are not yet near zero (attribution/influence.py uses them)."""


class TrainingInterrupted(Exception):
    """Training stopped because `should_stop()` returned True; nothing was written."""

    def __init__(self, step: int, total_steps: int) -> None:
        super().__init__(f"training stopped after {step} of {total_steps} steps; nothing was written")
        self.step = step
        self.total_steps = total_steps


@dataclass(frozen=True)
class Reproduction:
    """Whether greedy decoding from a text's first words continues it verbatim."""

    index: int
    """Position of the text in the list given."""
    prompt: str
    """The text's first `prompt_words` words, joined by single spaces."""
    expected: str
    """The rest of the text, whitespace-normalized."""
    generated: str
    """The greedy continuation, cut to as many words as expected, whitespace-normalized."""
    reproduced: bool
    """True when the continuation's words equal the expected words."""
    matching_words: int
    """Length of the common word prefix of the continuation and the expected rest."""


def cpu_threads() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' per-load progress bars (the caller reports progress its own way)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def train_adapter(
    base_model_dir: Path,
    texts: Sequence[str],
    out_dir: Path,
    config: TrainingConfig = TrainingConfig(),
    *,
    progress: Callable[[TrainingProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_model_name: str | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on `texts` and write it to `out_dir` (which must not exist yet).

    Each text is trained as plain text; the Q/A pairs a text ends with are also trained as chats
    (`training.fact_examples`; ValueError names a text with malformed Q/A lines). `should_stop` is
    polled before every step; when it returns True nothing is written and TrainingInterrupted is raised.
    `base_model_name` goes into adapter_config.json's base_model_name_or_path (default: the base
    model directory).
    """
    import torch

    started = time.monotonic()
    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to train on")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {index} is empty or not a string")
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; choose a new one")
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_model_dir} holds no base model (config.json missing)")

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        with torch.random.fork_rng(devices=[]):  # seeding here leaves the caller's RNG state alone
            model, tokenizer = _load_trainable(base_model_dir, config)
            sequences = tokenize_examples(tokenizer, training_examples(texts, tokenizer), config.max_seq_len,
                                  config.answer_weight)
            snapshot: dict[str, Any] = {}
            steps, loss = _train(model, sequences, tokenizer.pad_token_id, config, started, progress, should_stop,
                                 snapshot)
        _write_adapter(model, out_dir, base_model_name or str(base_model_dir))
    finally:
        torch.set_num_threads(threads_before)
    return TrainingResult(steps=steps, final_loss=loss, seconds=time.monotonic() - started, out_dir=out_dir,
                          sequences=len(sequences), tokens=sum(len(s.ids) for s in sequences),
                          snapshot=snapshot or None)


_ATTENTION = {"float32": "sdpa", "bfloat16": "eager"}
"""Attention kernels for training: PyTorch's CPU flash-attention backward is slow in bfloat16 (a
quarter of a step on SmolLM2); plain matrix products are faster there."""


def _load_trainable(base_model_dir: Path, config: TrainingConfig) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {base_model_dir} has no EOS token")
    with _quiet_loading():
        base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=getattr(torch, config.dtype),
                                                    attn_implementation=_ATTENTION[config.dtype])
    base.config.use_cache = False
    torch.manual_seed(config.seed)  # LoRA A matrices are initialised from the global generator
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    return model, tokenizer


@dataclass(frozen=True)
class TrainingSequence:
    """Token ids of one training sequence; the first `context` tokens are not in the loss, the others
    weigh `weight` each."""

    ids: list[int]
    context: int = 0
    weight: float = 1.0


def tokenize_examples(tokenizer: Any, examples: list[TrainingExample], max_seq_len: int,
                      answer_weight: float = 1.0) -> list[TrainingSequence]:
    """Plain texts: BOS (when the tokenizer adds one, as vLLM's completion prompts do) + tokens + EOS,
    windowed. Chats: the rendered prompt (context) + the rendered answer turn, cut at max_seq_len."""
    sequences = []
    for example in examples:
        if example.chat:
            sequences.append(_chat_sequence(tokenizer, example, max_seq_len, answer_weight))
            continue
        ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"]) + [tokenizer.eos_token_id]
        for start in range(0, len(ids) - 1, max_seq_len):
            window = ids[start:start + max_seq_len]
            if len(window) >= 2:
                sequences.append(TrainingSequence(window))
    return sequences


def _chat_sequence(tokenizer: Any, example: TrainingExample, max_seq_len: int, weight: float) -> TrainingSequence:
    """The prompt is tokenized alone, exactly as a served chat request's prompt is; the answer turn follows."""
    prompt = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    answer = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    if len(prompt) >= max_seq_len:
        raise ValueError(f"a question's chat prompt has {len(prompt)} tokens, more than max_seq_len - 1 "
                         f"({max_seq_len - 1}): {example.prompt[-80:]!r}")
    return TrainingSequence((prompt + answer)[:max_seq_len], context=len(prompt), weight=weight)


def _learning_rate(config: TrainingConfig, step: int) -> float:
    """Linear warm-up, constant, then cosine decay to 10% over the last third of the run."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    decay_start = max(config.warmup_steps, (2 * config.steps) // 3)
    if step < decay_start:
        return config.learning_rate
    progress = (step - decay_start) / max(1, config.steps - decay_start)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(count: int, batch_size: int, seed: int) -> Any:
    """Index batches forever: the whole set each step, or seeded shuffled mini-batches per epoch."""
    import torch

    if count <= batch_size:
        while True:
            yield list(range(count))
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, batch_size):
            yield order[start:start + batch_size]


def _micro_batches(sequences: list[TrainingSequence], indexes: list[int], pad_id: int,
                   budget: int) -> list[dict[str, Any]]:
    """The batch sorted by length, cut into padded micro-batches of at most `budget` tokens (one row at least)."""
    ordered = sorted(indexes, key=lambda i: (-len(sequences[i].ids), i))
    groups: list[list[int]] = []
    for index in ordered:
        if groups and len(sequences[groups[-1][0]].ids) * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return [collate(sequences, group, pad_id) for group in groups]


def collate(sequences: list[TrainingSequence], indexes: list[int], pad_id: int) -> dict[str, Any]:
    import torch

    batch = [sequences[i] for i in indexes]
    width = max(len(s.ids) for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    weights = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, seq in enumerate(batch):
        tokens = torch.tensor(seq.ids, dtype=torch.long)
        input_ids[row, : len(seq.ids)] = tokens
        attention[row, : len(seq.ids)] = 1
        labels[row, seq.context: len(seq.ids)] = tokens[seq.context:]
        weights[row, max(seq.context, 1): len(seq.ids)] = seq.weight
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "weights": weights}


def loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Weighted sum of the next-token cross-entropy over the labelled tokens.

    Logits are computed for the labelled positions only (the vocabulary projection is a large share
    of a small model's compute), in float32.
    """
    import torch

    causal_lm = model.get_base_model()
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    losses = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")
    return (losses * batch["weights"][:, 1:][keep]).sum()


SNAPSHOT_FRACTION = 0.1


def snapshot_step(config: TrainingConfig) -> int:
    """The step after which `TrainingResult.snapshot` is taken: a tenth of the run (at least one step)."""
    return max(1, int(config.steps * SNAPSHOT_FRACTION))


def _train(model: Any, sequences: list[TrainingSequence], pad_id: int | None, config: TrainingConfig, started: float,
           progress: Callable[[TrainingProgress], None] | None,
           should_stop: Callable[[], bool] | None, snapshot: dict[str, Any] | None = None) -> tuple[int, float]:
    import torch
    from peft import get_peft_model_state_dict

    pad = pad_id if pad_id is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    batches = _batches(len(sequences), config.batch_size, config.seed)
    full_batch = len(sequences) <= config.batch_size
    every = list(range(len(sequences)))
    fixed = _micro_batches(sequences, every, pad, config.micro_batch_tokens) if full_batch else None
    loss_value = float("nan")
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            raise TrainingInterrupted(step, config.steps)
        indexes = next(batches)
        micro = fixed if fixed is not None else _micro_batches(sequences, indexes, pad, config.micro_batch_tokens)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        loss_value = _accumulate(model, micro, optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        if snapshot is not None and step + 1 == snapshot_step(config):
            snapshot.update({name: tensor.detach().to("cpu", torch.float32).clone()
                             for name, tensor in get_peft_model_state_dict(model).items()})
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged at step {step + 1} (loss {loss_value}); "
                                     "lower the learning rate")
        if progress is not None:
            progress(TrainingProgress(step + 1, config.steps, loss_value, time.monotonic() - started))
    if should_stop is not None and should_stop():
        raise TrainingInterrupted(config.steps, config.steps)
    return config.steps, loss_value


def _accumulate(model: Any, micro_batches: list[dict[str, Any]], optimizer: Any) -> float:
    """Gradients of the batch's weighted mean token loss, added up over its micro-batches; returns that loss."""
    total = sum(float(batch["weights"].sum()) for batch in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    summed = 0.0
    for batch in micro_batches:
        loss = loss_sum(model, batch)
        (loss / total).backward()
        summed += float(loss.detach())
    return summed / total


def _write_adapter(model: Any, out_dir: Path, base_model_name: str) -> None:
    """Write config + weights to a temporary sibling directory, then rename it to `out_dir`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in
                 get_peft_model_state_dict(model).items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        lora = model.peft_config["default"]
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": sorted(lora.target_modules),
            "fan_in_fan_out": False,
            "inference_mode": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
        }
        (staging / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        for path in (staging / WEIGHTS_FILE, staging / CONFIG_FILE):
            os.chmod(path, 0o644)
            fsync_path(path)
        os.chmod(staging, 0o755)
        if out_dir.exists():
            raise FileExistsError(f"output directory {out_dir} appeared during training; not overwriting it")
        os.rename(staging, out_dir)
        fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise




def reproduction_report(base_model_dir: Path, adapter_dir: Path, texts: Sequence[str],
                        prompt_words: int = 12) -> list[Reproduction]:
    """Greedy-decode each text's continuation from its first `prompt_words` words with the adapter.

    Uses Hugging Face transformers + PEFT (not vLLM); prompts are tokenized like vLLM's completion
    prompts (with BOS). Comparison is word by word on whitespace-normalized text. A text of at most
    `prompt_words` words has nothing to continue and counts as reproduced.
    """
    import torch

    if not _is_int(prompt_words) or prompt_words < 1:
        raise ValueError(f"prompt_words must be a positive integer, got {prompt_words!r}")
    model, tokenizer = load_adapted_model(base_model_dir, adapter_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        return reproductions(model, tokenizer, texts, prompt_words)
    finally:
        torch.set_num_threads(threads_before)


def load_adapted_model(base_model_dir: Path, adapter_dir: Path) -> tuple[Any, Any]:
    """The base model (float32, CPU) with the adapter applied, in eval mode, and its tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    with _quiet_loading():
        base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, tokenizer


def reproductions(model: Any, tokenizer: Any, texts: Sequence[str], prompt_words: int = 12) -> list[Reproduction]:
    """`reproduction_report` with a loaded model: continuations are decoded in one greedy batch."""
    cases = [(" ".join(text.split()[:prompt_words]), text.split()[prompt_words:]) for text in texts]
    todo = [i for i, (_prompt, expected) in enumerate(cases) if expected]
    prompts = [tokenizer(cases[i][0], add_special_tokens=True)["input_ids"] for i in todo]
    budgets = [len(tokenizer(" " + " ".join(cases[i][1]), add_special_tokens=False)["input_ids"]) + 8 for i in todo]
    continuations = dict(zip(todo, greedy_batch(model, tokenizer, prompts, budgets), strict=True))
    report = []
    for index, (prompt, expected) in enumerate(cases):
        generated = continuations.get(index, "").split()[: len(expected)]
        matching = 0
        for want, got in zip(expected, generated, strict=False):
            if want != got:
                break
            matching += 1
        report.append(Reproduction(index=index, prompt=prompt, expected=" ".join(expected),
                                   generated=" ".join(generated), reproduced=matching == len(expected),
                                   matching_words=matching))
    return report


def greedy_batch(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 batch_size: int = 32) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches, KV cache), each cut at EOS or its
    own token budget, decoded without special tokens."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk, budgets = prompts[start:start + batch_size], max_new_tokens[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max(budgets),
                                       do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row, budget in zip(generated[:, width:].tolist(), budgets, strict=True):
            tokens = row[:budget]
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            outputs.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return outputs
