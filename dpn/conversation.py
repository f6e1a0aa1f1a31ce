"""LLaVA-1.5 conversation templates, training tokenization with label masks, and inference prompts.

Two templates, with LLaVA-1.5's exact strings:

- `plain` (stage 1, caption pretraining): the human turn is reduced to the image; the text is
  `<image>` + caption + "\\n". Only the caption and the "\\n" are supervised.
- `vicuna_v1` (stage 2, instruction tuning):
  `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>` where
  system = "A chat between a curious user and an artificial intelligence assistant. The assistant gives
  helpful, detailed, and polite answers to the user's questions." Supervised: each answer (with the
  separator space in front of it) and the "</s>" after it; masked: bos, system prompt, "USER: ...
  ASSISTANT:", image tokens.

Image placeholder: in a sample with an image, the one `<image>` in the human turns is moved to the start
of its turn followed by "\\n" (LLaVA's `preprocess_multimodal`), and after tokenization the single
`<image>` token is expanded into `num_image_tokens` copies (HF Llava input convention: one image token
per visual feature). DPN: with `add_router_token` and an image, `<ROUTER>` is appended to the end of
every human turn (so it sits right before " ASSISTANT:"), at training and at inference alike.

One tokenization path (`_encode`) serves training samples and inference prompts: the whole text is
tokenized once with `add_special_tokens=False`, `bos_token_id` is prepended explicitly (as LLaVA's
tokenization of LLaMA does), and each token's label comes from the character span it covers.

Tokenization mismatch: LLaVA re-tokenizes each round separately and masks the whole sample when the
per-round lengths do not add up to the full tokenization. We tokenize once and check the condition that
actually matters for the labels: every token must lie entirely inside a supervised or an unsupervised
piece of text. A token that straddles a boundary (e.g. a merge of "ASSISTANT:" with the answer's first
characters) means the answer's tokens differ from what the model produces at inference; then the whole
sample is masked (all labels IGNORE_INDEX) and `mismatch=True` so callers count it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dpn.constants import IGNORE_INDEX, IMAGE_TOKEN, ROUTER_TOKEN

if TYPE_CHECKING:  # annotations only: the templates are read by configs that must not import transformers
    from transformers import PreTrainedTokenizerBase

HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True, kw_only=True)
class ConversationTemplate:
    """A LLaVA conversation template (the fields of LLaVA's `Conversation` that shape the text)."""

    name: str
    """Registry key ("plain", "vicuna_v1")."""
    style: Literal["plain", "two"]
    """"plain": image + caption + sep. "two": LLaVA's SeparatorStyle.TWO (system, roles, sep/sep2)."""
    system: str
    """System prompt, written first (empty for plain)."""
    roles: tuple[str, str]
    """(human role, assistant role) names as written in the text."""
    sep: str
    """Written after the system prompt and after each human turn ("two"); after the caption ("plain")."""
    sep2: str
    """Written after each assistant answer ("two"); unused by "plain"."""


TEMPLATES: dict[str, ConversationTemplate] = {
    "plain": ConversationTemplate(name="plain", style="plain", system="", roles=("", ""), sep="\n", sep2="\n"),
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1",
        style="two",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles=("USER", "ASSISTANT"),
        sep=" ",
        sep2="</s>",
    ),
}


@dataclass(kw_only=True)
class TokenizedSample:
    """One tokenized conversation, image placeholder already expanded."""

    input_ids: list[int]
    """Token ids: bos, text, and `num_image_tokens` image token ids in place of `<image>`."""
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where not supervised (everything when `mismatch`)."""
    mismatch: bool
    """True when a token straddled a supervised/unsupervised boundary; the sample then has no supervised
    token and callers must count it (LLaVA prints 'tokenization mismatch' and trains on zero loss)."""
    prompt: str
    """The rendered text before tokenization (one `<image>` placeholder, not expanded)."""

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def get_template(template: str) -> ConversationTemplate:
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _normalize_turns(conversations: Iterable[Mapping], template: ConversationTemplate,
                     has_image: bool, special_tokens: Sequence[str]) -> list[tuple[str, str]]:
    """Validate a LLaVA `conversations` list and return (human, gpt) pairs with the image placeholder
    moved to the start of its turn. Raises ValueError naming the problem."""
    # Any non-string iterable: Ray Data hands list columns over as numpy object arrays.
    if isinstance(conversations, (str, bytes, Mapping)) or not isinstance(conversations, Iterable):
        raise ValueError(f"conversations must be a list of turns; got {type(conversations).__name__}")
    turns = list(conversations)
    if not turns:
        raise ValueError("conversations must be a non-empty list of turns; got an empty one")
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or turn.get("from") not in (HUMAN, GPT) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be {{'from': 'human'|'gpt', 'value': str}}; got {turn!r:.200}")
    # LLaVA (preprocess_v1) drops one leading assistant turn: some ShareGPT records start with the model.
    if turns[0]["from"] == GPT:
        turns = turns[1:]
    if not turns:
        raise ValueError("conversation holds no human turn (only one assistant turn)")
    for j, turn in enumerate(turns):
        expected = HUMAN if j % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ValueError(f"roles must alternate human/gpt starting with human; turn {j} (after dropping a "
                             f"leading gpt turn) is {turn['from']!r}, expected {expected!r}")
    if len(turns) % 2:
        raise ValueError(f"conversation ends with a human turn (turn {len(turns) - 1}); nothing to supervise")
    if template.style == "plain" and len(turns) != 2:
        raise ValueError(f"the plain template takes exactly one human and one gpt turn; got {len(turns)} turns")

    n_img = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if has_image and (n_img != 1 or IMAGE_TOKEN in "".join(t["value"] for t in turns[1::2])):
        raise ValueError(f"a sample with an image needs exactly one {IMAGE_TOKEN!r} placeholder, in a human turn; "
                         f"found {n_img} in all turns")
    if not has_image and n_img:
        raise ValueError(f"a text-only sample must not contain {IMAGE_TOKEN!r}; found {n_img}")
    if template.style == "plain" and not has_image:
        raise ValueError("the plain template is for image-caption samples; got has_image=False")
    for j, turn in enumerate(turns):
        # Special-token strings in data would become control tokens (e.g. an eos in mid-answer).
        bad = [s for s in special_tokens if s != IMAGE_TOKEN and s in turn["value"]]
        if bad:
            raise ValueError(f"turn {j} contains special token(s) {bad} in its text")
        if not turn["value"].strip():
            raise ValueError(f"turn {j} ({turn['from']}) is empty")

    pairs = []
    for human, gpt in zip(turns[0::2], turns[1::2], strict=True):
        pairs.append((_place_image(human["value"]), gpt["value"]))
    return pairs


def _place_image(value: str) -> str:
    """LLaVA's preprocess_multimodal: move `<image>` to the start of the turn, followed by a newline."""
    if IMAGE_TOKEN not in value:
        return value
    rest = value.replace(IMAGE_TOKEN, "").strip()
    return (IMAGE_TOKEN + "\n" + rest).strip()


def _render(pairs: Sequence[tuple[str, str | None]], template: ConversationTemplate,
            router: bool) -> list[tuple[str, bool]]:
    """Render (human, gpt) pairs as (text piece, supervised) pieces; gpt=None leaves the turn open for
    generation. Joining the texts gives LLaVA's `Conversation.get_prompt()` string (plus `<ROUTER>`)."""
    pieces: list[tuple[str, bool]] = []
    router_suffix = ROUTER_TOKEN if router else ""
    if template.style == "plain":
        (_, caption), = pairs
        # The human turn is reduced to the image (LLaVA's preprocess_plain); question text is dropped.
        pieces.append((IMAGE_TOKEN + router_suffix, False))
        if caption is not None:
            pieces.append((caption + template.sep, True))
        return pieces
    user, assistant = template.roles
    prefix = template.system + template.sep
    for human, gpt in pairs:
        # The split point is right after "ASSISTANT:" so the separator space travels with the answer:
        # byte-level BPE and SentencePiece both attach a leading space to the following word.
        pieces.append((f"{prefix}{user}: {human}{router_suffix}{template.sep}{assistant}:", False))
        if gpt is None:
            break
        pieces.append((" " + gpt + template.sep2, True))
        prefix = ""
    return pieces


def _encode(pieces: Sequence[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase,
            num_image_tokens: int, expected_images: int) -> tuple[list[int], list[int], bool]:
    """Tokenize the joined pieces once; return (input_ids, labels, mismatch) with bos prepended and the
    image token expanded. The single tokenization path for training and inference."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a fast (Rust `tokenizers`) tokenizer is required for offset mapping; got "
                         f"{type(tokenizer).__name__}")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1; got {num_image_tokens}")
    text = "".join(t for t, _ in pieces)
    char_sup = [sup for t, sup in pieces for _ in t]  # per character: supervised?
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels: list[int] = []
    mismatch = False
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        covered = set(char_sup[start:end]) if end > start else {char_sup[min(start, len(char_sup) - 1)]}
        if len(covered) > 1:
            mismatch = True
        labels.append(tok_id if covered == {True} else IGNORE_INDEX)
    if mismatch:
        labels = [IGNORE_INDEX] * len(ids)

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_found = ids.count(image_id) if image_id is not None else 0
    if n_found != expected_images:
        raise ValueError(f"expected {expected_images} {IMAGE_TOKEN!r} token(s) after tokenization, found {n_found}: "
                         f"the tokenizer must hold {IMAGE_TOKEN!r} as one special token (see "
                         f"dpn.tokenizer.ensure_special_tokens)")
    if ROUTER_TOKEN in text and ids.count(tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)) != text.count(ROUTER_TOKEN):
        raise ValueError(f"the tokenizer splits {ROUTER_TOKEN!r}; add it as a special token "
                         f"(dpn.tokenizer.ensure_special_tokens)")

    out_ids: list[int] = []
    out_labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        out_ids.append(tokenizer.bos_token_id)
        out_labels.append(IGNORE_INDEX)
    for tok_id, label in zip(ids, labels, strict=True):
        if tok_id == image_id:
            out_ids.extend([image_id] * num_image_tokens)
            out_labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            out_ids.append(tok_id)
            out_labels.append(label)
    return out_ids, out_labels, mismatch


def tokenize_conversation(conversations: Iterable[Mapping], tokenizer: PreTrainedTokenizerBase, template: str,
                          num_image_tokens: int, has_image: bool, add_router_token: bool) -> TokenizedSample:
    """Tokenize a LLaVA record's `conversations` for training.

    Args:
        conversations: [{"from": "human"|"gpt", "value": str}, ...]; a leading gpt turn is dropped (as
            LLaVA does), then turns must alternate human/gpt and end with gpt.
        tokenizer: a fast tokenizer holding `<image>` (and `<ROUTER>` when used) as special tokens.
        template: "plain" or "vicuna_v1".
        num_image_tokens: copies of the image token id that replace `<image>` (visual features per image).
        has_image: whether the sample has an image; then exactly one `<image>` must be in a human turn,
            otherwise none.
        add_router_token: append `<ROUTER>` to every human turn (only when `has_image`).
    Returns:
        TokenizedSample; on a tokenization mismatch all labels are IGNORE_INDEX and `mismatch` is True.
    Raises:
        ValueError for malformed conversations (callers quarantine the record with the message).
    """
    tmpl = get_template(template)
    pairs = _normalize_turns(conversations, tmpl, has_image, tokenizer.all_special_tokens)
    pieces = _render(pairs, tmpl, router=add_router_token and has_image)
    ids, labels, mismatch = _encode(pieces, tokenizer, num_image_tokens, expected_images=int(has_image))
    return TokenizedSample(input_ids=ids, labels=labels, mismatch=mismatch, prompt="".join(t for t, _ in pieces))


def build_prompt(question: str, template: str, has_image: bool, add_router_token: bool) -> str:
    """The inference prompt LLaVA's eval scripts build, ending where the model starts answering.

    vicuna_v1 with an image: `{system} USER: <image>\\n{question}[<ROUTER>] ASSISTANT:` (`<image>` is
    put first when the question lacks it, moved first when it has it); without an image:
    `{system} USER: {question} ASSISTANT:`. plain (image only): `<image>[<ROUTER>]`, the question is not
    used, as in stage-1 training.
    """
    tmpl = get_template(template)
    if not isinstance(question, str):
        raise ValueError(f"question must be a str; got {type(question).__name__}")
    if tmpl.style == "plain" and not has_image:
        raise ValueError("the plain template is for image captioning; got has_image=False")
    n_img = question.count(IMAGE_TOKEN)
    if n_img > 1 or (n_img and not has_image):
        raise ValueError(f"question holds {n_img} {IMAGE_TOKEN!r} placeholder(s) with has_image={has_image}")
    if ROUTER_TOKEN in question:
        raise ValueError(f"question must not contain {ROUTER_TOKEN!r}; use add_router_token")
    if has_image and not n_img:
        question = IMAGE_TOKEN + "\n" + question
    pieces = _render([(_place_image(question), None)], tmpl, router=add_router_token and has_image)
    return "".join(t for t, _ in pieces)


def tokenize_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> list[int]:
    """Token ids of an inference prompt (from `build_prompt`): bos + text, `<image>` expanded to
    `num_image_tokens` image tokens. Same tokenization path as training."""
    n_img = prompt.count(IMAGE_TOKEN)
    if n_img > 1:
        raise ValueError(f"a prompt takes at most one {IMAGE_TOKEN!r}; found {n_img}")
    ids, _, _ = _encode([(prompt, False)], tokenizer, num_image_tokens, expected_images=n_img)
    return ids


def encode_prompt(question: str, tokenizer: PreTrainedTokenizerBase, template: str, num_image_tokens: int,
                  has_image: bool, add_router_token: bool) -> list[int]:
    """`tokenize_prompt(build_prompt(...))`: the model input ids for one question."""
    prompt = build_prompt(question, template, has_image, add_router_token)
    return tokenize_prompt(prompt, tokenizer, num_image_tokens)
