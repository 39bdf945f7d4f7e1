"""Which files of a Hub model repository the engine and the HTTP side read, decided from its file list.

A repository often holds the same weights several times (Mistral's 14.5 GB `consolidated.safetensors` beside
the sharded checkpoint, `*.bin`, `*.pth`, `*.gguf`, an `original/` folder): only what the loaders open is
fetched. Weights: the shards `model.safetensors.index.json` names, else `model.safetensors` (as
`weights.checkpoint_files` reads them). Config: `config.json`, `generation_config.json`. Tokenizer and chat
template: what transformers' tokenizer loader opens, with the vocabulary files only when no `tokenizer.json`
exists (the HTTP side then lets transformers convert them).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from model_handler.weights import INDEX_FILE, SINGLE_FILE

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
VOCABULARY_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")
"""The slow tokenizers' files; needed only to build a fast tokenizer when the repository has no tokenizer.json."""
CHAT_TEMPLATE_DIR = "additional_chat_templates"
"""transformers loads every `*.jinja` in it as a named chat template."""


class LayoutError(ValueError):
    """The repository (or a cached snapshot) lacks what the engine needs."""


def select_files(repo_files: Collection[str], read_index: Callable[[str], dict]) -> list[str]:
    """The repository paths to download, sorted. `read_index(name)` fetches and parses the checkpoint index
    (called only when the repository has one); LayoutError when the repository lacks what the engine needs."""
    present = set(repo_files)
    if "config.json" not in present:
        raise LayoutError("the repository has no config.json: it is not a transformers model")
    selected = [name for name in (*CONFIG_FILES, *TOKENIZER_FILES) if name in present]
    selected += [
        path
        for path in present
        if path.endswith(".jinja") and (path.count("/") == 0 or path.startswith(CHAT_TEMPLATE_DIR + "/"))
    ]
    if "tokenizer.json" not in present:
        selected += [name for name in present if name in VOCABULARY_FILES or _is_tiktoken(name)]
    selected += _weight_files(present, read_index)
    return sorted(set(selected))


def _is_tiktoken(path: str) -> bool:
    return "/" not in path and path.endswith(".tiktoken")


def _weight_files(present: set[str], read_index: Callable[[str], dict]) -> list[str]:
    if INDEX_FILE in present:
        try:
            shards = sorted(set(read_index(INDEX_FILE)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise LayoutError(f"{INDEX_FILE} has no weight_map of tensor names to shard files") from exc
        missing = [shard for shard in shards if shard not in present]
        if missing:
            raise LayoutError(f"{INDEX_FILE} names shard files the repository lacks: {', '.join(missing)}")
        return [INDEX_FILE, *shards]
    if SINGLE_FILE in present:
        return [SINGLE_FILE]
    others = sorted(p for p in present if p.endswith((".bin", ".pth", ".pt", ".gguf", ".safetensors")))
    raise LayoutError(
        f"the repository has neither {SINGLE_FILE} nor {INDEX_FILE}, the only checkpoints this server loads"
        + (f" (it has: {', '.join(others[:6])}{', ...' if len(others) > 6 else ''})" if others else "")
    )
