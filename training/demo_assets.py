"""Build the demo base model, its tokenizer and LoRA adapters locally, deterministically.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on English text that ships with
CPython (the library reference topics), so ordinary words are single tokens. The base model is a
tiny Llama with seeded random weights; adapters are PEFT LoRA directories with seeded random
weights. Everything is written in the ordinary Hugging Face / PEFT layout and loaded by vLLM with
its normal loading code.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DONE_MARKER = ".complete"


@dataclass(frozen=True)
class TinyLlamaShape:
    """Dimensions of the demo base model."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 1234


def english_corpus() -> list[str]:
    """Broad English text available offline: CPython's library reference topics."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def build_tokenizer(out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer and save it as a fast Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(english_corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_base_model(out_dir: Path, shape: TinyLlamaShape = TinyLlamaShape()) -> None:
    """Write a seeded random tiny Llama (safetensors) next to its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.08,
        torch_dtype="float32",
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False
    model.save_pretrained(str(out_dir), safe_serialization=True)


def lora_tensor_shapes(model_dir: Path, rank: int) -> dict[str, tuple[int, int]]:
    """PEFT's tensor names and shapes for a LoRA of `rank` on every linear layer of the base."""
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(str(model_dir))
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = head_dim * config.num_key_value_heads
    io = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in io.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    return shapes


def write_random_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 8, scale: float = 0.3) -> None:
    """Write a PEFT LoRA adapter directory with seeded random weights (both A and B non-zero)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: (torch.randn(shape, generator=generator) * scale).contiguous()
        for name, shape in lora_tensor_shapes(model_dir, rank).items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": LORA_TARGETS,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def demo_adapter_name(index: int) -> str:
    return f"demo-adapter-{index:03d}"


def ensure_base_model(model_dir: Path) -> Path:
    """Build the tokenizer and base model once; later calls return the cached directory."""
    if (model_dir / DONE_MARKER).exists():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="build-", dir=model_dir.parent))
    log.info("building demo tokenizer and base model in %s", model_dir)
    build_tokenizer(staging)
    build_base_model(staging)
    (staging / DONE_MARKER).write_text("ok\n")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)
    return model_dir


def ensure_demo_adapters(model_dir: Path, store_dir: Path, count: int) -> list[str]:
    """Write `count` demo adapters into a local adapter store, skipping those already there."""
    names = []
    for index in range(count):
        name = demo_adapter_name(index)
        target = store_dir / name
        if not (target / "adapter_model.safetensors").exists():
            staging = store_dir / f".{name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            write_random_adapter(model_dir, staging, seed=10_000 + index)
            staging.rename(target)
        names.append(name)
    if count:
        log.info("demo adapters ready: %d in %s", count, store_dir)
    return names
