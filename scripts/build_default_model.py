"""Build the small embedded default model in ``promptcache/data/default_model/`` (Hugging Face format).

The model is a tiny Llama (4 layers, hidden 256, GQA 8/2 heads, 8192 positions) with random weights from
``torch.manual_seed(0)``: it produces nonsense, but it exercises every code path of the server (tokenizer, chat
template, prefix cache, sampler) with no download. Its tokenizer is a real byte-level BPE (the GPT-2 / Llama-3 /
Qwen kind) trained here on an offline corpus: the Python standard library's own sources, which every machine
running this script has.

Run from anywhere::

    python scripts/build_default_model.py [--out DIR]

The output depends only on this script, the Python version's standard library (the corpus), ``../shared/seed.txt``
when present, and the versions of ``tokenizers`` / ``torch`` / ``transformers``; running it twice gives the same
bytes. Needs ``torch`` and ``transformers`` (build-time only; the server itself does not import transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "promptcache" / "data" / "default_model"
SEED_TEXT = REPO.parent / "shared" / "seed.txt"

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
# Ordinary (not special) added tokens, as in Qwen2.5: tool-call markers are one token each and survive
# decode(skip_special_tokens=True), so a tool-call parser can find them in the text.
EXTRA_TOKENS = ["<tool_call>", "</tool_call>"]

# The Qwen2 pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS_EXTENSIONS = (".py", ".txt", ".rst")
CORPUS_FILE_CHARS = 4_000  # the head of every file, so the corpus spans the whole library, not its first modules
CORPUS_TOTAL_CHARS = 6_000_000

# ChatML, Qwen2.5 style, without Qwen's default system message. Content is a string or a list of
# {"type": "text", "text": ...} parts (joined with newlines); tool-call arguments may be a JSON string (OpenAI
# style, copied verbatim) or an object (rendered with tojson).
CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content if part is mapping and part.type == 'text' -%}
            {{- part.text -}}
            {%- if not loop.last %}{{- '\\n' -}}{%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}
        {{- content -}}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- set text = render_content(message.content) %}
        {%- if text %}
            {{- '\\n' + text }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def corpus_files() -> list[Path]:
    """The standard library's text files (no site-packages, no caches), in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in stdlib.rglob("*")
        if p.suffix in CORPUS_EXTENSIONS
        and p.is_file()
        and not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(stdlib).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def corpus() -> Iterator[str]:
    """The training texts: the head of each standard-library file, then the project's seed text if present."""
    total = 0
    for path in corpus_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > CORPUS_FILE_CHARS:
            cut = text.rfind("\n", 0, CORPUS_FILE_CHARS)
            text = text[: cut + 1 if cut > 0 else CORPUS_FILE_CHARS]
        if total + len(text) > CORPUS_TOTAL_CHARS:
            break
        total += len(text)
        yield text
    if SEED_TEXT.is_file():
        yield SEED_TEXT.read_text(encoding="utf-8")


def build_tokenizer(out: Path) -> dict[str, int]:
    """Train the byte-level BPE, save ``tokenizer.json`` and return the ids of the special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(EXTRA_TOKENS),
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=24,
        show_progress=False,
    )
    texts = list(corpus())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise RuntimeError(f"trained vocabulary has {size} tokens, expected {VOCAB_SIZE} (corpus too small?)")
    tok.save(str(out / "tokenizer.json"), pretty=True)
    print(f"tokenizer: {len(texts)} texts, {sum(map(len, texts)) / 1e6:.1f} M chars, vocab {size}")
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + EXTRA_TOKENS}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_configs(out: Path, ids: dict[str, int]) -> dict:
    """Write tokenizer_config.json, config.json and generation_config.json; return the model config dict."""
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + EXTRA_TOKENS
    }
    write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
        },
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": im_end,
        # no pad_token_id here: transformers would zero that token's embedding row (padding_idx) at init
        "torch_dtype": "float32",
    }
    write_json(out / "config.json", config)
    write_json(
        out / "generation_config.json",
        {"bos_token_id": None, "eos_token_id": [im_end, eot], "pad_token_id": eot},
    )
    return config


def build_weights(out: Path) -> int:
    """Random float32 weights from transformers' own init under ``torch.manual_seed(0)``; returns their count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    state = model.state_dict()
    state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    tensors = {name: t.detach().contiguous().clone() for name, t in sorted(state.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ids = build_tokenizer(out)
    build_configs(out, ids)
    params = build_weights(out)
    print(f"model: {params / 1e6:.2f} M parameters; built in {time.perf_counter() - start:.1f} s")
    total = 0
    for f in sorted(out.iterdir()):
        size = f.stat().st_size
        total += size
        digest = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        print(f"  {f.name:28s} {size:>11,d} B  sha256 {digest}")
    print(f"  {'total':28s} {total:>11,d} B")


if __name__ == "__main__":
    main()
