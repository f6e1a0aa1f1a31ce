"""Tokenizers for DPN: an in-process byte-level BPE for the embedded tiny model, and loading/patching of
real LLaMA/Vicuna (llava-hf) tokenizers.

Fixed special-token ids of `train_tokenizer` (they follow the LLaMA/Vicuna layout for unk/bos/eos, and
the `tiny` preset's defaults for pad and image):

    0 "<unk>"   1 "<s>" (bos)   2 "</s>" (eos)   3 "<pad>"   4 "<image>"   5 "<ROUTER>"

All six are added tokens with `special=True`: they are matched before pre-tokenization, so they are never
split, and text between them is tokenized on its own. The trained tokenizer adds NO bos/eos by itself
(no post-processor); `dpn.conversation` prepends `bos_token_id` explicitly and always tokenizes with
`add_special_tokens=False`, which behaves the same for this tokenizer and for LLaMA tokenizers (whose
post-processor would otherwise add `<s>`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dpn.constants import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, ROUTER_TOKEN, UNK_TOKEN

# Order = id. Changing it changes every token id of trained tokenizers (and the `tiny` preset's defaults).
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, ROUTER_TOKEN)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID, ROUTER_ID = range(len(SPECIAL_TOKENS))

# 256 byte symbols + the special tokens must fit; anything below leaves no room for merges.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` in-process and wrap it as a HF fast tokenizer.

    Special tokens get the fixed ids in `SPECIAL_TOKENS`. Deterministic: the same texts (in the same
    order) give the same vocabulary and merges. Every byte is in the initial alphabet, so no text ever
    maps to `<unk>`. `vocab_size` is an upper bound (a small corpus may yield fewer merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # GPT-2 style: the regex splits words/numbers/punctuation/whitespace, and merges never cross those
    # boundaries (so "ASSISTANT:" and " answer" stay separate tokens). No prefix space: "<image>\nWhat"
    # must tokenize the same whether or not it starts the string.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:  # guards against a `tokenizers` change in how it numbers specials
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, ROUTER_TOKEN],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with `save_pretrained` from a local directory (never the hub)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"tokenizer path {str(p)!r} is not a directory (a local save_pretrained dir is required)")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase, router_token: bool = True) -> int:
    """Add `<image>`, `<ROUTER>` (unless `router_token` is False) and a pad token to `tokenizer` where
    missing; return how many were added.

    The caller resizes the model's embeddings when the result is > 0. llava-hf tokenizers already have
    `<image>` (32000) and `<pad>` (32001), so only `<ROUTER>` is added there. An original Vicuna
    tokenizer has no pad token: `<pad>` is added as a new token (LLaVA itself reuses `<unk>` as pad; a
    separate id keeps padding distinguishable from text).
    """
    # Tokens already in the vocabulary are not added again (they count 0) but are flagged special, so they
    # are never split; `replace_extra_special_tokens=False` keeps the tokenizer's existing extra specials.
    wanted = [IMAGE_TOKEN, ROUTER_TOKEN] if router_token else [IMAGE_TOKEN]
    added = tokenizer.add_special_tokens({"extra_special_tokens": wanted}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return added


# Written beside a prepared tokenizer: the ids the model config must use, checked by the pipeline.
TOKENS_FILE = "dpn_tokens.json"


def prepare_tokenizer(src: str | os.PathLike, out: str | os.PathLike, router_token: bool = False) -> dict:
    """Make a LLaMA / Vicuna tokenizer directory ready for DPN: add `<image>`, `<ROUTER>` (with
    `router_token`, for recipes that route on it) and a pad token where missing, save it to `out` and
    record the ids in `out/dpn_tokens.json`. Returns that record.

    `out` must be absent or empty, or hold a tokenizer prepared the same way from the same source (then it
    is left as is): a prepared tokenizer is an input of every later step, so it is never overwritten.
    The model's embeddings must grow to `vocab_size` (the training code resizes them on load).
    """
    import json

    src, out = Path(src), Path(out)
    tokenizer = load_tokenizer(src)
    before = len(tokenizer)
    added = ensure_special_tokens(tokenizer, router_token=router_token)
    record = {
        "source": str(src.absolute()),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "router_token_id": tokenizer.convert_tokens_to_ids(ROUTER_TOKEN) if router_token else None,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size_before": before,
        "vocab_size": len(tokenizer),
        "added": added,
    }
    if out.exists() and any(out.iterdir()):
        previous = out / TOKENS_FILE
        if previous.is_file() and json.loads(previous.read_text()) == record:
            return record
        raise FileExistsError(f"--out {out} is not empty and holds no tokenizer prepared this way from {src}; "
                              "choose a new or empty directory")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / TOKENS_FILE).write_text(json.dumps(record, indent=2))
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return record


def check_prepared(path: str | os.PathLike, router_token: bool) -> list[str]:
    """Problems of tokenizer directory `path` for a recipe (empty list = ready): `<image>` (and
    `<ROUTER>` when the recipe routes on it) must be single special tokens, a pad token must exist, and
    a `dpn_tokens.json` record, when present, must name the same ids."""
    import json

    problems = []
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        return [f"tokenizer {path}: cannot be loaded ({e})"]
    wanted = [IMAGE_TOKEN] + ([ROUTER_TOKEN] if router_token else [])
    for token in wanted:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            problems.append(f"tokenizer {path}: {token} is not one token (run `dpn tokenizer prepare --from {path} "
                            f"--out DIR{' --router-token' if router_token else ''}`)")
    if tokenizer.pad_token_id is None:
        problems.append(f"tokenizer {path}: no pad token (run `dpn tokenizer prepare`)")
    record = Path(path) / TOKENS_FILE
    if record.is_file() and not problems:
        r = json.loads(record.read_text())
        for key, token in (("image_token_id", IMAGE_TOKEN), ("router_token_id", ROUTER_TOKEN)):
            if r.get(key) is not None and r[key] != tokenizer.convert_tokens_to_ids(token):
                problems.append(f"tokenizer {path}: {TOKENS_FILE} records {key}={r[key]}, the tokenizer has "
                                f"{tokenizer.convert_tokens_to_ids(token)}")
    return problems

