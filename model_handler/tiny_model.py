"""Builds, with no download, a small Llama-architecture HF model folder: random weights, a byte-level BPE
tokenizer trained on the Python reference text that CPython ships (`pydoc_data.topics`), and a tool-aware chat
template of one of the formats in `tiny_chat_formats.py` (Hermes/ChatML by default, or Llama 3.1 JSON).

Torch-free (numpy + tokenizers), so the HTTP side and the launcher can resolve the default model cheaply.
`python -m model_handler.tiny_model [--preset NAME] [OUT]` prints the folder it built (or found cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_handler import envs
from model_handler.tiny_chat_formats import CHAT_FORMATS, HERMES, TinyChatFormat

FORMAT_VERSION = 3  # bump when the folder layout or contents change, so caches rebuild
SPECIAL_TOKENS = list(HERMES.special_tokens)  # ids 0..3 of the default (hermes) format
BOS_TOKEN, IM_START, EOS_TOKEN, PAD_TOKEN = SPECIAL_TOKENS


@dataclass(slots=True, frozen=True)
class TinyModelSpec:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 640
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0
    # Std of every random weight (norm weights are 1). HF's usual 0.02 leaves the layers' output small next to the
    # tied embedding, so the model echoes its input token and greedy text repeats one token forever; ~1.6/sqrt(hidden)
    # lets the layers dominate, so greedy text varies at nearly every step.
    init_std: float = 0.1
    chat_format: str = HERMES.name
    """A key of `tiny_chat_formats.CHAT_FORMATS`: the tokens and chat template the folder gets."""


PRESETS: dict[str, TinyModelSpec] = {
    "tiny": TinyModelSpec(),  # 3.8M parameters: tests and the embedded default
    "tiny-llama3-json": TinyModelSpec(chat_format="llama3_json"),  # the same size with Llama 3.1's tool format
    "llama-100m": TinyModelSpec(  # 110M parameters: the CPU benchmark model
        vocab_size=8192,
        hidden_size=768,
        intermediate_size=3072,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        init_std=0.06,  # the same ~1.6/sqrt(hidden): varied text, activations far inside fp16's range
    ),
}


def _train_tokenizer(vocab_size: int, chat_format: TinyChatFormat):
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*chat_format.special_tokens, *chat_format.plain_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: exact round trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The trainer makes every listed token special; the plain markers decode as text, as Qwen's do.
    data = json.loads(tokenizer.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in chat_format.plain_tokens
    return Tokenizer.from_str(json.dumps(data))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(out: Path, spec: TinyModelSpec) -> None:
    chat_format = CHAT_FORMATS[spec.chat_format]
    _train_tokenizer(spec.vocab_size, chat_format).save(str(out / "tokenizer.json"))
    special = {
        "bos_token": chat_format.bos_token,
        "eos_token": chat_format.eos_tokens[0],
        "pad_token": chat_format.pad_token,
    }
    # "PreTrainedTokenizerFast" loads in transformers 4.x and 5.x (5.x's own name, TokenizersBackend, only in 5.x);
    # the template sits in both places older and newer readers look.
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "unk_token": None,
            "model_max_length": spec.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "chat_template": chat_format.template,
        },
    )
    _write_json(out / "special_tokens_map.json", special)
    (out / "chat_template.jinja").write_text(chat_format.template)


def _write_configs(out: Path, spec: TinyModelSpec) -> None:
    chat_format = CHAT_FORMATS[spec.chat_format]
    bos_id, pad_id = (chat_format.special_tokens.index(t) for t in (chat_format.bos_token, chat_format.pad_token))
    eos_ids = [chat_format.special_tokens.index(token) for token in chat_format.eos_tokens]
    eos_id = eos_ids[0]
    rope_theta = 10000.0
    _write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "head_dim": spec.hidden_size // spec.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": spec.max_position_embeddings,
            "initializer_range": spec.init_std,
            "rms_norm_eps": 1e-6,
            "rope_theta": rope_theta,  # the 4.x spelling; 5.x reads rope_parameters
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "use_cache": True,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "dtype": "float32",
        },
    )
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    generation["pad_token_id"] = pad_id
    _write_json(out / "generation_config.json", generation)


def _write_weights(out: Path, spec: TinyModelSpec) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(spec.seed)
    head_dim = spec.hidden_size // spec.num_heads
    h, i = spec.hidden_size, spec.intermediate_size

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.init_std)

    tensors = {"model.embed_tokens.weight": normal(spec.vocab_size, h), "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        tensors[p + "self_attn.q_proj.weight"] = normal(spec.num_heads * head_dim, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(spec.num_kv_heads * head_dim, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(spec.num_kv_heads * head_dim, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, spec.num_heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = normal(i, h)
        tensors[p + "mlp.up_proj.weight"] = normal(i, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, i)
        tensors[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    # tied embeddings: no lm_head.weight; "format": "pt" is what transformers' loader checks for
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes it private; the folder is meant to be shared


def build_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 4096,
    hidden_size: int = 256,
    intermediate_size: int = 640,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    init_std: float = 0.1,
    chat_format: str = HERMES.name,
) -> Path:
    """Write a complete model folder into `out_dir` (created if needed) and return its path."""
    spec = TinyModelSpec(
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        max_position_embeddings,
        seed,
        init_std,
        chat_format,
    )
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    if not init_std > 0:
        raise ValueError(f"init_std ({init_std}) must be positive")
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}; known: {', '.join(CHAT_FORMATS)}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size ({vocab_size}) must hold the 256 byte tokens and the special tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, spec)
    _write_configs(out, spec)
    _write_weights(out, spec)
    return out


def model_dir_name(preset: str, spec: TinyModelSpec) -> str:
    """`<preset>-<hash of the parameters, the chat format's tokens and template, and FORMAT_VERSION>`: any change
    gives a fresh folder (a folder cached before a template change is never served again)."""
    chat_format = dataclasses.asdict(CHAT_FORMATS[spec.chat_format])
    key = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(spec), "chat": chat_format}, sort_keys=True)
    return f"{preset}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def default_model_dir(preset: str = "tiny", cache: str | None = None) -> Path:
    """The cached folder of a preset under `cache` (default: TINY_MODEL_CACHE), built on first use.

    The build goes to a temporary sibling that is renamed into place, so concurrent callers (pytest
    workers, engine and tests) never see half a folder; when two build at once, the first rename wins.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    root = Path(cache or envs.TINY_MODEL_CACHE).expanduser()
    final = root / model_dir_name(preset, spec)
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        build_tiny_model(tmp, **dataclasses.asdict(spec))
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be readable like any cache entry
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; a loser's copy otherwise
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("out", nargs="?", help="build into this folder instead of the cache")
    args = parser.parse_args(argv)
    if args.out:
        path = build_tiny_model(args.out, **dataclasses.asdict(PRESETS[args.preset]))
    else:
        path = default_model_dir(args.preset)
    print(path)


if __name__ == "__main__":
    main()
