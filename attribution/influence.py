"""Gradient influence of a LoRA adapter's training contributions on a response (method `lora-influence-v1`).

What it estimates. Leaving contribution c out of training would change the adapter's weights by
about H^-1 g_c (g_c: the gradient of c's summed token loss; H: the loss's curvature), and so change a
response r's log-probability by about -g_r . H^-1 g_c. The method scores every contribution by
s_c = g_r . H^-1 g_c: the larger, the more r's probability rests on c.

Where the gradients are taken. At the trained weights an adapter that has fitted its data has almost no
gradient left on it, and what remains does not tell contributions apart. Gradients are therefore taken at
an early snapshot of the same training run (the LoRA weights after a tenth of the steps,
training.lora_training.TrainingResult.snapshot), where each contribution still pulls the weights its own
way: a one-checkpoint version of TracIn's sum over checkpoints. The snapshot is stored in the features
file, so inference takes g_r at the same point.

How (TRAK/LoGra-style, made cheap by LoRA):

- Only the LoRA weights are differentiated (all layers, or the last `top_layers`), so the gradient has a
  few million entries at most. It is projected to `sketch_dim` entries by a seeded count sketch (each
  entry goes to one random bucket with a random sign): inner products are kept in expectation, the
  projection costs one pass over the gradient, and it is rebuilt from the seed instead of stored.
- Curvature: a damped empirical Fisher in the sketched space, H = G'G/n + lambda I, over the training
  sequences' gradients G (lambda = `damping` x the mean eigenvalue), as TRAK and DataInf do. The
  features file stores W = H^-1/2 and, per contribution, the sum of its sequences' gradients; psi_c =
  W sum_i g_i follows from the two.
- At inference one forward and backward pass over prompt + response gives g_r; q = W g_r;
  s_c = psi_c . q. How specifically r points at c is the cosine of the unwhitened sums and g_r (the
  whitening flattens the directions common to all training text, which would make every cosine small).

Features are computed once when the adapter is trained (`build_features`), written beside it as
``influence.safetensors``, and bound to it: the file records the sha256 of the adapter's weights file,
the contribution ids in order, and a checksum of its own tensors. `InfluenceFeatures.load` refuses a
file that is missing (`FeaturesMissing`), unreadable or altered (`FeaturesCorrupt`) or made for other
weights (`FeaturesStale`): a retrained adapter never uses the features of the one before.

How the scores become weights is the policy's job (attribution/policy.py `InfluenceWeighting`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attribution.policy import InfluenceWeighting
from ledger.client.trace import TokenAttribution
from statedir.durable_files import fsync_path

METHOD = "lora-influence-v1"
FEATURES_FILE = "influence.safetensors"
FORMAT_VERSION = "2"  # 2: the unwhitened sums and the snapshot are stored; psi is derived
SNAPSHOT_PREFIX = "snapshot."
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's name, as in training.lora_training.WEIGHTS_FILE


class FeaturesUnavailable(Exception):
    """The adapter's influence features cannot be used; the message says which file and why."""


class FeaturesMissing(FeaturesUnavailable):
    """The adapter has no features file."""


class FeaturesCorrupt(FeaturesUnavailable):
    """The features file cannot be read, or its contents do not match its own checksum or shapes."""


class FeaturesStale(FeaturesUnavailable):
    """The features were computed for other adapter weights (the adapter was trained again) or another lineage."""


@dataclass(frozen=True)
class InfluenceSettings:
    """How gradients are taken and projected; recorded in the features file and used again at inference."""

    sketch_dim: int = 1024
    """Entries of the projected gradient (the count sketch's buckets)."""
    top_layers: int = 0
    """Differentiate the LoRA weights of only the last N decoder layers (0: every layer). Fewer layers make the
    backward pass shorter."""
    damping: float = 0.1
    """lambda of the damped Fisher, as a multiple of its mean eigenvalue."""
    seed: int = 0
    """Seed of the count sketch's buckets and signs."""

    def __post_init__(self) -> None:
        if not isinstance(self.sketch_dim, int) or not 16 <= self.sketch_dim <= 16384:
            raise ValueError(f"sketch_dim must be an integer from 16 to 16384, got {self.sketch_dim!r}")
        if not isinstance(self.top_layers, int) or self.top_layers < 0:
            raise ValueError(f"top_layers must be an integer >= 0, got {self.top_layers!r}")
        if not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 100:
            raise ValueError(f"damping must be in (0, 100], got {self.damping!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an integer from 0 to 2**31 - 1, got {self.seed!r}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


# ---- gradients ------------------------------------------------------------------------------------------

def _lora_parameters(model: Any, top_layers: int) -> list[tuple[str, Any]]:
    """(canonical name, parameter) of the LoRA weights to differentiate, sorted by name; the rest frozen.

    The canonical name drops the PEFT adapter name, so several adapters loaded in one model sketch alike.
    """
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    layers = model.get_base_model().config.num_hidden_layers
    first = layers - top_layers if top_layers else 0
    chosen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(False)
        if ".lora_" not in name or f".{adapter}." not in name:
            continue
        layer = _layer_of(name)
        if layer is not None and layer >= first:
            chosen.append((name.replace(f".{adapter}.", "."), parameter))
    if not chosen:
        raise ValueError("the model has no LoRA weights to differentiate")
    for _, parameter in chosen:
        parameter.requires_grad_(True)
    return sorted(chosen, key=lambda item: item[0])


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for before, value in zip(parts, parts[1:]):
        if before == "layers" and value.isdigit():
            return int(value)
    return None


class GradientSketch:
    """The count sketch of the chosen LoRA weights' gradient: bucket and sign per entry, from the seed."""

    def __init__(self, model: Any, settings: InfluenceSettings) -> None:
        import torch

        self.settings = settings
        self.parameters = _lora_parameters(model, settings.top_layers)
        generator = torch.Generator().manual_seed(settings.seed)
        self._buckets, self._signs = [], []
        for _, parameter in self.parameters:
            count = parameter.numel()
            self._buckets.append(torch.randint(0, settings.sketch_dim, (count,), generator=generator))
            self._signs.append(torch.randint(0, 2, (count,), generator=generator).float() * 2 - 1)
        self.entries = sum(parameter.numel() for _, parameter in self.parameters)

    def gradient(self, model: Any, batch: dict[str, Any]) -> np.ndarray:
        """The sketched gradient of the batch's summed weighted token loss (one sequence per batch)."""
        import torch

        from training.lora_training import loss_sum

        for _, parameter in self.parameters:
            parameter.grad = None
        loss_sum(model, batch).backward()
        out = torch.zeros(self.settings.sketch_dim, dtype=torch.float32)
        for (_, parameter), buckets, signs in zip(self.parameters, self._buckets, self._signs, strict=True):
            if parameter.grad is not None:
                out.index_add_(0, buckets, parameter.grad.reshape(-1).float() * signs)
                parameter.grad = None
        return out.numpy().astype(np.float64)


def response_batch(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> dict[str, Any]:
    """A one-row batch whose loss is the completion's summed token loss given the prompt."""
    from training.lora_training import TrainingSequence, collate

    ids = [int(t) for t in prompt_ids] + [int(t) for t in completion_ids]
    return collate([TrainingSequence(ids, context=max(len(prompt_ids), 1))], [0], 0)


def contribution_sequences(tokenizer: Any, texts: Sequence[str], max_seq_len: int = 256,
                           answer_weight: float = 1.0) -> list[tuple[int, Any]]:
    """(text index, TrainingSequence) for every sequence each text is trained as (plain text, windows, chats)."""
    from training.fact_examples import training_examples
    from training.lora_training import tokenize_examples

    sequences = []
    for index, text in enumerate(texts):
        for sequence in tokenize_examples(tokenizer, training_examples([text], tokenizer), max_seq_len, answer_weight):
            sequences.append((index, sequence))
    return sequences


# ---- features -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InfluenceFeatures:
    """An adapter's stored features: the gradient sum per contribution and the whitener W (see the module docstring)."""

    contribution_ids: tuple[str, ...]
    whitener: np.ndarray
    """[sketch_dim, sketch_dim]: W = H^-1/2."""
    raw: np.ndarray
    """[contributions, sketch_dim]: the sums of c's sequence gradients before whitening (for the cosine)."""
    snapshot: dict[str, np.ndarray]
    """The LoRA weights the gradients are taken at (an early point of training; empty: the adapter's own)."""
    settings: InfluenceSettings
    adapter_sha256: str

    @functools.cached_property
    def features(self) -> np.ndarray:
        """[contributions, sketch_dim]: psi_c = W sum of c's sequence gradients."""
        return self.raw @ self.whitener.T

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"whitener": self.whitener, "raw": self.raw}
        out.update({SNAPSHOT_PREFIX + name: value for name, value in self.snapshot.items()})
        return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in out.items()}

    def save(self, adapter_dir: Path) -> Path:
        """Write ``influence.safetensors`` into `adapter_dir` atomically; return its path."""
        from safetensors.numpy import save_file

        tensors = self.tensors()
        metadata = {
            "method": METHOD, "format_version": FORMAT_VERSION, "adapter_sha256": self.adapter_sha256,
            "contribution_ids": json.dumps(list(self.contribution_ids)),
            "settings": json.dumps(asdict(self.settings), sort_keys=True),
            "tensors_sha256": _tensors_sha256(tensors),
        }
        target = Path(adapter_dir) / FEATURES_FILE
        handle, staging = tempfile.mkstemp(prefix=f".{FEATURES_FILE}.", dir=adapter_dir)
        os.close(handle)
        try:
            save_file(tensors, staging, metadata=metadata)
            os.chmod(staging, 0o644)
            fsync_path(Path(staging))
            os.replace(staging, target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, adapter_dir: Path, lineage_contribution_ids: Sequence[str] | None = None) -> InfluenceFeatures:
        """The features beside the adapter in `adapter_dir`, checked against its weights (and lineage, if given).

        Raises FeaturesMissing, FeaturesCorrupt or FeaturesStale, each naming the file.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(adapter_dir) / FEATURES_FILE
        if not path.is_file():
            raise FeaturesMissing(f"adapter {adapter_dir} has no influence features ({path} is missing); "
                                  "train the adapter again, or register it with verbatim attribution")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            whitener, raw = tensors["whitener"], tensors["raw"]
            settings = InfluenceSettings(**json.loads(metadata["settings"]))
            contribution_ids = tuple(str(c) for c in json.loads(metadata["contribution_ids"]))
            recorded = metadata["tensors_sha256"]
            adapter_sha256 = metadata["adapter_sha256"]
            version = metadata["format_version"]
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise FeaturesCorrupt(f"influence features {path} cannot be read: {exc}") from None
        if version != FORMAT_VERSION or metadata.get("method") != METHOD:
            raise FeaturesCorrupt(f"influence features {path} are of format {version!r} / {metadata.get('method')!r}; "
                                  f"expected {FORMAT_VERSION!r} / {METHOD!r}")
        k = settings.sketch_dim
        if raw.shape != (len(contribution_ids), k) or whitener.shape != (k, k):
            raise FeaturesCorrupt(f"influence features {path} have shapes {raw.shape} and {whitener.shape} "
                                  f"for {len(contribution_ids)} contributions of dimension {k}")
        if _tensors_sha256(tensors) != recorded:
            raise FeaturesCorrupt(f"influence features {path} do not match their checksum (altered or damaged)")
        weights = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
        actual = file_sha256(weights) if weights.is_file() else "(no weights file)"
        if actual != adapter_sha256:
            raise FeaturesStale(f"influence features {path} were computed for adapter weights "
                                f"{adapter_sha256[:12]}…, but {weights.name} is {actual[:12]}…: "
                                "the adapter was trained again without them")
        if lineage_contribution_ids is not None:
            unknown = sorted(set(contribution_ids) - set(lineage_contribution_ids))
            if unknown:
                raise FeaturesStale(f"influence features {path} name {len(unknown)} contributions outside the "
                                    f"adapter's lineage (first: {unknown[0][:16]}…)")
        snapshot = {name[len(SNAPSHOT_PREFIX):]: value for name, value in tensors.items()
                    if name.startswith(SNAPSHOT_PREFIX)}
        return cls(contribution_ids, whitener.astype(np.float64), raw.astype(np.float64), snapshot, settings,
                   adapter_sha256)


def whitener_of(gradients: np.ndarray, damping: float) -> np.ndarray:
    """W = (G'G/n + lambda I)^-1/2, lambda = damping x mean eigenvalue of G'G/n."""
    count, dim = gradients.shape
    fisher = gradients.T @ gradients / max(count, 1)
    damp = damping * max(float(np.trace(fisher)) / dim, 1e-12)
    values, vectors = np.linalg.eigh(fisher + damp * np.eye(dim))
    return (vectors * (1.0 / np.sqrt(np.maximum(values, damp)))) @ vectors.T


def build_features(base_model_dir: Path, adapter_dir: Path, contributions: Sequence[tuple[str, str]],
                   settings: InfluenceSettings = InfluenceSettings(), *, max_seq_len: int = 256,
                   answer_weight: float = 1.0, snapshot: dict[str, Any] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Compute the features of `contributions` ((id, text), the texts the adapter was trained on) and save them
    beside the adapter. Gradients are taken at `snapshot` (LoRA weights from early in training, see
    training.lora_training.TrainingResult.snapshot) when given, else at the adapter's own weights.
    `progress(done, total)` is called after each training sequence."""
    adapter_dir = Path(adapter_dir)
    if not contributions:
        raise ValueError("no contributions to compute influence features for")
    kept = {name: np.asarray(value.float().numpy() if hasattr(value, "numpy") else value, dtype=np.float32)
            for name, value in (snapshot or {}).items()}
    model, tokenizer = load_for_gradients(base_model_dir, adapter_dir, kept)
    sketch = GradientSketch(model, settings)
    ids = [cid for cid, _ in contributions]
    sequences = contribution_sequences(tokenizer, [text for _, text in contributions], max_seq_len, answer_weight)
    gradients = np.zeros((len(sequences), settings.sketch_dim))
    owners = np.zeros(len(sequences), dtype=np.int64)
    from training.lora_training import collate

    for row, (owner, sequence) in enumerate(sequences):
        gradients[row] = sketch.gradient(model, collate([sequence], [0], tokenizer.pad_token_id or 0))
        owners[row] = owner
        if progress is not None:
            progress(row + 1, len(sequences))
    whitener = whitener_of(gradients, settings.damping)
    summed = np.zeros((len(ids), settings.sketch_dim))
    np.add.at(summed, owners, gradients)
    features = InfluenceFeatures(tuple(ids), whitener, summed, kept, settings,
                                 file_sha256(adapter_dir / ADAPTER_WEIGHTS_FILE))
    return features.save(adapter_dir)


def load_for_gradients(base_model_dir: Path, adapter_dir: Path,
                       snapshot: dict[str, np.ndarray] | None = None) -> tuple[Any, Any]:
    """The base model (float32) with the adapter's LoRA weights (or `snapshot`'s) differentiable, in eval mode,
    and its tokenizer."""
    import torch
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32,
                                                attn_implementation="eager")
    base.config.use_cache = False
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    if snapshot:
        result = set_peft_model_state_dict(model, {name: torch.from_numpy(np.array(value, dtype=np.float32))
                                                   for name, value in snapshot.items()})
        if getattr(result, "unexpected_keys", None):
            raise FeaturesCorrupt(f"the snapshot names weights the adapter lacks: {result.unexpected_keys[:3]}")
    model.eval()
    return model, tokenizer


# ---- scoring --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InfluenceScores:
    """Per contribution: s_c (the estimated loss of log-probability without c) and its cosine."""

    contribution_ids: tuple[str, ...]
    scores: np.ndarray
    cosines: np.ndarray
    seconds: float
    """Time taken by the gradient and the scoring."""


class InfluenceScorer:
    """Scores responses of one adapter against its features (holds the model; not thread-safe). An
    `AttributionMethod` (attribution/policy.py): `token_weights` turns the scores into per-token weights."""

    name = METHOD

    def __init__(self, model: Any, features: InfluenceFeatures) -> None:
        self.model = model
        self.features = features
        self.sketch = GradientSketch(model, features.settings)
        self._raw_norms = np.linalg.norm(features.raw, axis=1)

    @classmethod
    def open(cls, base_model_dir: Path, adapter_dir: Path,
             lineage_contribution_ids: Sequence[str] | None = None) -> InfluenceScorer:
        features = InfluenceFeatures.load(adapter_dir, lineage_contribution_ids)
        model, _ = load_for_gradients(base_model_dir, adapter_dir, features.snapshot)
        return cls(model, features)

    def scores(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> InfluenceScores:
        started = time.perf_counter()
        gradient = self.sketch.gradient(self.model, response_batch(prompt_ids, completion_ids))
        scores = self.features.features @ (self.features.whitener @ gradient)
        denominator = self._raw_norms * max(float(np.linalg.norm(gradient)), 1e-30)
        cosines = np.where(denominator > 0, (self.features.raw @ gradient) / np.maximum(denominator, 1e-30), 0.0)
        return InfluenceScores(self.features.contribution_ids, scores, cosines, time.perf_counter() - started)

    def token_weights(self, context_ids: Sequence[int], completion_ids: Sequence[int],
                      weighting: InfluenceWeighting | None = None) -> list[TokenAttribution]:
        """The response's influence as one TokenAttribution per completion token (`InfluenceWeighting`)."""
        return (weighting or InfluenceWeighting()).token_weights(self.scores(context_ids, completion_ids),
                                                                 completion_ids)


def features_after_training(base_model_dir: Path, adapter_dir: Path, contributions: Sequence[tuple[str, str]],
                            training: Any, result: Any = None,
                            progress: Callable[[int, int], None] | None = None) -> Path:
    """`build_features` for an adapter just trained by training.lora_training.train_adapter with `training`
    (a TrainingConfig) on these (contribution id, text) pairs; `result` is its TrainingResult."""
    return build_features(base_model_dir, adapter_dir, contributions, InfluenceSettings(),
                          max_seq_len=training.max_seq_len, answer_weight=training.answer_weight,
                          snapshot=getattr(result, "snapshot", None), progress=progress)
