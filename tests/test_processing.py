"""LLaVA processing layer: tokenizer, conversation templates and label masks, image preprocessing, collate."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoImageProcessor, PreTrainedTokenizerFast

from dpn.collate import collate
from dpn.constants import IGNORE_INDEX
from dpn.conversation import build_prompt, encode_prompt, tokenize_conversation, tokenize_prompt
from dpn.image_processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    build_image_processor,
    expand2square,
    preprocess_images,
    to_rgb,
)
from dpn.tokenizer import ensure_special_tokens, load_tokenizer, train_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
CORPUS = [
    SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A red square on a blue background.</s>",
    "USER: What colour is it? ASSISTANT: It is red.</s>",
    "a small cat sits on a mat\n",
    "three green circles near the top left corner\n",
] * 5

CONV = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "Red"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def runs(tok, sample):
    """Decoded text of each contiguous run of supervised tokens."""
    out, cur = [], []
    for tid, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def masked_text(tok, sample):
    return tok.decode([t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab == IGNORE_INDEX])


# ---------------------------------------------------------------- tokenizer

def test_special_token_ids_and_never_split(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<image>", "<ROUTER>"]) == [4, 5]
    ids = tok("x<image>y<ROUTER>z</s><pad><s>", add_special_tokens=False).input_ids
    assert [i for i in ids if i < 6] == [4, 5, 2, 3, 1]
    assert tok("<image><image>", add_special_tokens=False).input_ids == [4, 4]
    # no automatic bos/eos
    assert tok("a", add_special_tokens=True).input_ids == tok("a", add_special_tokens=False).input_ids
    assert len(tok) <= 400


def test_train_tokenizer_is_deterministic(tok):
    again = train_tokenizer(CORPUS, vocab_size=400)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (3, 1, 2, 0)
    assert loaded.convert_tokens_to_ids(["<image>", "<ROUTER>"]) == [4, 5]
    a = tokenize_conversation(CONV, tok, "vicuna_v1", 3, has_image=True, add_router_token=True)
    b = tokenize_conversation(CONV, loaded, "vicuna_v1", 3, has_image=True, add_router_token=True)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert ensure_special_tokens(loaded) == 0
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")


def _bare_tokenizer(pre_tokenizer, specials=("<unk>", "<s>", "</s>")):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizer
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    return t


def test_ensure_special_tokens_adds_missing():
    t = PreTrainedTokenizerFast(tokenizer_object=_bare_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False)),
                                unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    n = len(t)
    assert ensure_special_tokens(t) == 3
    assert len(t) == n + 3 and t.pad_token == "<pad>"
    assert t.tokenize("a<image>b<ROUTER>") == ["a", "<image>", "b", "<ROUTER>"]
    assert ensure_special_tokens(t) == 0

    # llava-hf style: <image> and <pad> already present -> only <ROUTER> is new
    t2 = PreTrainedTokenizerFast(tokenizer_object=_bare_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False)),
                                 unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    t2.add_tokens(["<image>"], special_tokens=True)
    t2.add_special_tokens({"pad_token": "<pad>"})
    image_id = t2.convert_tokens_to_ids("<image>")
    assert ensure_special_tokens(t2) == 1
    assert t2.convert_tokens_to_ids("<image>") == image_id
    assert t2.convert_tokens_to_ids("<ROUTER>") == len(t2) - 1


# ---------------------------------------------------------------- conversation templates

def test_vicuna_multiturn_with_router(tok):
    s = tokenize_conversation(CONV, tok, "vicuna_v1", num_image_tokens=3, has_image=True, add_router_token=True)
    assert s.prompt == (SYSTEM + " USER: <image>\nWhat is in the image?<ROUTER> ASSISTANT: A red square.</s>"
                        "USER: What colour is it?<ROUTER> ASSISTANT: Red</s>")
    assert not s.mismatch
    assert s.input_ids[0] == 1 and s.labels[0] == IGNORE_INDEX
    assert s.input_ids.count(4) == 3
    first_img = s.input_ids.index(4)
    assert s.input_ids[first_img:first_img + 3] == [4, 4, 4]
    assert s.input_ids.count(5) == 2
    # exactly the answers (with their leading separator space) and the </s> after each are supervised
    assert runs(tok, s) == [" A red square.</s>", " Red</s>"]
    assert masked_text(tok, s) == ("<s>" + SYSTEM + " USER: <image><image><image>\nWhat is in the image?<ROUTER>"
                                   " ASSISTANT:USER: What colour is it?<ROUTER> ASSISTANT:")
    # each <ROUTER> is the last token of its human turn: the tokens after it spell " ASSISTANT:"
    for pos in [i for i, t in enumerate(s.input_ids) if t == 5]:
        nxt = next(j for j in range(pos + 1, len(s.labels)) if s.labels[j] != IGNORE_INDEX)
        assert tok.decode(s.input_ids[pos + 1:nxt]) == " ASSISTANT:"
    assert s.num_supervised == len(tok(" A red square.</s> Red</s>", add_special_tokens=False).input_ids)


def test_vicuna_single_turn_without_router(tok):
    conv = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red square."}]
    s = tokenize_conversation(conv, tok, "vicuna_v1", num_image_tokens=5, has_image=True, add_router_token=False)
    assert s.prompt == SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A red square.</s>"
    assert 5 not in s.input_ids and s.input_ids.count(4) == 5
    assert runs(tok, s) == [" A red square.</s>"]
    # supervised tokens are the tail of the sequence
    n = s.num_supervised
    assert all(lab == IGNORE_INDEX for lab in s.labels[:-n]) and s.labels[-n:] == s.input_ids[-n:]


def test_text_only_sample_gets_no_router(tok):
    conv = [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "It is red."}]
    s = tokenize_conversation(conv, tok, "vicuna_v1", num_image_tokens=3, has_image=False, add_router_token=True)
    assert s.prompt == SYSTEM + " USER: What colour is it? ASSISTANT: It is red.</s>"
    assert 4 not in s.input_ids and 5 not in s.input_ids
    assert runs(tok, s) == [" It is red.</s>"]


def test_numpy_object_array_of_turns(tok):
    s = tokenize_conversation(np.array(CONV[:2], dtype=object), tok, "vicuna_v1", 2, has_image=True,
                              add_router_token=False)
    assert s.prompt == SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A red square.</s>"


def test_leading_gpt_turn_is_dropped(tok):
    conv = [{"from": "gpt", "value": "Hello"}] + CONV[:2]
    s = tokenize_conversation(conv, tok, "vicuna_v1", 2, has_image=True, add_router_token=False)
    assert s.prompt == SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A red square.</s>"


def test_plain_template(tok):
    conv = [{"from": "human", "value": "Describe this picture <image> briefly."},
            {"from": "gpt", "value": "a small cat sits on a mat"}]
    s = tokenize_conversation(conv, tok, "plain", num_image_tokens=4, has_image=True, add_router_token=False)
    assert s.prompt == "<image>a small cat sits on a mat\n"
    assert s.input_ids[:5] == [1, 4, 4, 4, 4] and s.labels[:5] == [IGNORE_INDEX] * 5
    assert all(lab != IGNORE_INDEX for lab in s.labels[5:])
    assert runs(tok, s) == ["a small cat sits on a mat\n"]

    r = tokenize_conversation(conv, tok, "plain", num_image_tokens=4, has_image=True, add_router_token=True)
    assert r.prompt == "<image><ROUTER>a small cat sits on a mat\n"
    assert r.input_ids[:6] == [1, 4, 4, 4, 4, 5] and r.labels[:6] == [IGNORE_INDEX] * 6
    assert runs(tok, r) == ["a small cat sits on a mat\n"]


@pytest.mark.parametrize("conv, has_image, template, match", [
    ([], True, "vicuna_v1", "non-empty"),
    ("<image>hi", True, "vicuna_v1", "list of turns"),
    ([{"from": "gpt", "value": "hi"}], False, "vicuna_v1", "no human turn"),
    ([{"from": "human", "value": "<image>a"}, {"from": "human", "value": "b"}], True, "vicuna_v1", "alternate"),
    ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
     True, "vicuna_v1", "ends with a human turn"),
    ([{"from": "user", "value": "a"}, {"from": "gpt", "value": "b"}], False, "vicuna_v1", "turn 0"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], True, "vicuna_v1", "exactly one"),
    ([{"from": "human", "value": "<image>a<image>"}, {"from": "gpt", "value": "b"}], True, "vicuna_v1", "found 2"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>b"}], True, "vicuna_v1", "human turn"),
    ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}], False, "vicuna_v1", "text-only"),
    ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b</s>c"}], True, "vicuna_v1", "special"),
    ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "  "}], True, "vicuna_v1", "empty"),
    (CONV, True, "plain", "exactly one human and one gpt"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], False, "plain", "image-caption"),
    (CONV, True, "llava_v2", "unknown conversation template"),
])
def test_bad_conversations_raise(tok, conv, has_image, template, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(conv, tok, template, 2, has_image=has_image, add_router_token=False)


def test_tokenizer_without_image_special_token_is_rejected():
    t = PreTrainedTokenizerFast(tokenizer_object=_bare_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False)),
                                unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="ensure_special_tokens"):
        tokenize_conversation(CONV[:2], t, "vicuna_v1", 2, has_image=True, add_router_token=False)


def test_mismatch_masks_whole_sample_and_is_flagged():
    # Without the pre-tokenizer regex, BPE merges across "ASSISTANT:" and the answer: a token straddles the
    # supervised boundary, the situation LLaVA reports as "tokenization mismatch".
    specials = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<ROUTER>")
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["USER: hi ASSISTANT: yes"] * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bad = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens=["<image>", "<ROUTER>"])
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]
    samples = [tokenize_conversation(conv, bad, "vicuna_v1", 2, has_image=False, add_router_token=False)
               for _ in range(3)]
    assert sum(s.mismatch for s in samples) == 3
    s = samples[0]
    assert s.labels == [IGNORE_INDEX] * len(s.input_ids) and s.num_supervised == 0
    assert bad.decode(s.input_ids) == "<s>" + SYSTEM + " USER: hi ASSISTANT: yes</s>"


def test_sentencepiece_style_tokenizer_has_no_mismatch():
    # Metaspace pre-tokenization as in LLaMA/Vicuna tokenizers: "▁answer" carries the separator space.
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    ensure_special_tokens(sp)
    s = tokenize_conversation(CONV, sp, "vicuna_v1", 2, has_image=True, add_router_token=True)
    assert not s.mismatch
    sup = [sp.convert_ids_to_tokens(i) for i, lab in zip(s.input_ids, s.labels, strict=True) if lab != IGNORE_INDEX]
    assert "".join(sup) == "▁A▁red▁square.</s>▁Red</s>"


# ---------------------------------------------------------------- inference prompts

def test_build_prompt_strings():
    assert build_prompt("What is this?", "vicuna_v1", has_image=True, add_router_token=False) == (
        SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:")
    assert build_prompt("What is this?", "vicuna_v1", has_image=True, add_router_token=True) == (
        SYSTEM + " USER: <image>\nWhat is this?<ROUTER> ASSISTANT:")
    assert build_prompt("What is this?\n<image>", "vicuna_v1", has_image=True, add_router_token=False) == (
        SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:")
    assert build_prompt("Hi there", "vicuna_v1", has_image=False, add_router_token=True) == (
        SYSTEM + " USER: Hi there ASSISTANT:")
    assert build_prompt("ignored", "plain", has_image=True, add_router_token=False) == "<image>"
    assert build_prompt("ignored", "plain", has_image=True, add_router_token=True) == "<image><ROUTER>"
    with pytest.raises(ValueError, match="placeholder"):
        build_prompt("<image> x", "vicuna_v1", has_image=False, add_router_token=False)
    with pytest.raises(ValueError, match="has_image=False"):
        build_prompt("x", "plain", has_image=False, add_router_token=False)


def test_prompt_tokens_match_training_prefix(tok):
    """The inference prompt's ids are exactly the training sample's ids up to the first answer."""
    s = tokenize_conversation(CONV[:2], tok, "vicuna_v1", 3, has_image=True, add_router_token=True)
    ids = encode_prompt("What is in the image?", tok, "vicuna_v1", 3, has_image=True, add_router_token=True)
    first_sup = next(i for i, lab in enumerate(s.labels) if lab != IGNORE_INDEX)
    assert ids == s.input_ids[:first_sup]
    assert ids.count(4) == 3 and ids[-1] == tok.convert_tokens_to_ids(":")
    assert tokenize_prompt("<image>", tok, num_image_tokens=7) == [1] + [4] * 7
    with pytest.raises(ValueError, match="at most one"):
        tokenize_prompt("<image><image>", tok, 2)


# ---------------------------------------------------------------- images

def row(img):
    return [img.getpixel((x, 0)) for x in range(img.width)]


def test_to_rgb_modes():
    assert to_rgb(Image.new("L", (2, 2), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)

    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    out = to_rgb(p)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)

    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    out = to_rgb(rgba)
    # 255 * (1 - 128/255) = 127 for black at half alpha over white
    assert row(out) == [(255, 255, 255), (255, 0, 0), (127, 127, 127)]
    assert to_rgb(rgba, background=(122, 116, 104)).getpixel((0, 0)) == (122, 116, 104)

    la = Image.new("LA", (2, 1))
    la.putdata([(50, 0), (50, 255)])
    assert row(to_rgb(la)) == [(255, 255, 255), (50, 50, 50)]

    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    assert row(to_rgb(cmyk)) == [(255, 255, 255), (0, 255, 255), (0, 0, 0)]

    i16 = Image.new("I;16", (2, 1))
    i16.putpixel((0, 0), 65535)
    i16.putpixel((1, 0), 257 * 100)
    i32 = Image.new("I", (2, 1))
    i32.putpixel((0, 0), 65535)
    i32.putpixel((1, 0), 0)
    assert row(to_rgb(i32)) == [(255, 255, 255), (0, 0, 0)]
    assert row(to_rgb(i16)) == [(255, 255, 255), (100, 100, 100)]

    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb


def test_expand2square_geometry_and_fill():
    wide = expand2square(Image.new("RGB", (4, 2), (255, 0, 0)), (1, 2, 3))
    assert wide.size == (4, 4)
    a = np.asarray(wide)
    assert (a[0] == [1, 2, 3]).all() and (a[3] == [1, 2, 3]).all() and (a[1:3] == [255, 0, 0]).all()

    tall = expand2square(Image.new("RGB", (2, 5), (0, 255, 0)), (9, 9, 9))
    b = np.asarray(tall)
    assert tall.size == (5, 5)
    # offset (5 - 2) // 2 = 1: column 0 and columns 3-4 are fill
    assert (b[:, 0] == 9).all() and (b[:, 3:] == 9).all() and (b[:, 1:3] == [0, 255, 0]).all()

    sq = Image.new("RGB", (3, 3))
    assert expand2square(sq, (0, 0, 0)) is sq


def test_processor_shape_and_normalisation(tmp_path):
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    proc = build_image_processor(32)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)

    white = preprocess_images([Image.new("RGB", (50, 50), (255, 255, 255))], proc)
    assert white.shape == (1, 3, 32, 32) and white.dtype == torch.float32
    torch.testing.assert_close(white[0, :, 5, 5], (1 - mean) / std, atol=1e-4, rtol=0)  # (1.9303, 2.0749, 2.1459)

    # 40x20 white -> padded to 40x40 with (122, 116, 104) -> 32x32: rows 8..23 white, the rest padding (~0)
    wide = preprocess_images([Image.new("RGB", (40, 20), (255, 255, 255))], proc)[0]
    pad = (torch.tensor([122, 116, 104]) / 255 - mean) / std
    torch.testing.assert_close(wide[:, 2, 16], pad, atol=1e-3, rtol=0)
    assert pad.abs().max() < 0.02
    torch.testing.assert_close(wide[:, 16, 16], (1 - mean) / std, atol=1e-3, rtol=0)

    mixed = [Image.new("RGBA", (20, 30)), Image.new("L", (30, 20)), Image.new("CMYK", (8, 8))]
    assert preprocess_images(mixed, proc).shape == (3, 3, 32, 32)
    # transparent RGBA is white after to_rgb: the centre equals the white image's
    torch.testing.assert_close(preprocess_images(mixed[:1], proc)[0, :, 16, 16], (1 - mean) / std,
                               atol=1e-3, rtol=0)
    assert preprocess_images([], proc).shape == (0, 3, 32, 32)

    proc.save_pretrained(tmp_path)
    again = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    torch.testing.assert_close(preprocess_images(mixed, again), preprocess_images(mixed, proc))


# ---------------------------------------------------------------- collate

def _samples():
    img = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2)
    return [
        {"input_ids": [1, 4, 4, 7], "labels": [-100, -100, -100, 7], "pixel_values": img},
        {"input_ids": torch.tensor([1, 8]), "labels": torch.tensor([-100, 8]), "pixel_values": None},
    ], img


def test_collate_right_padding():
    samples, img = _samples()
    b = collate(samples, pad_token_id=3, image_token_id=4)
    assert b["input_ids"].tolist() == [[1, 4, 4, 7], [1, 8, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 7], [-100, 8, -100, -100]]
    assert b["pixel_values"].shape == (1, 3, 2, 2) and torch.equal(b["pixel_values"][0], img)
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long


def test_collate_left_padding_and_pixel_order():
    samples, img = _samples()
    other = img + 100
    samples.append({"input_ids": [4, 9], "labels": [-100, 9], "pixel_values": other})
    b = collate(samples, pad_token_id=0, padding_side="left")
    assert b["input_ids"].tolist() == [[1, 4, 4, 7], [0, 0, 1, 8], [0, 0, 4, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, -100, 7], [-100, -100, -100, 8], [-100, -100, -100, 9]]
    assert torch.equal(b["pixel_values"], torch.stack([img, other]))

    text_only = collate([samples[1]], pad_token_id=0)
    assert "pixel_values" not in text_only


def test_collate_validation():
    samples, img = _samples()
    with pytest.raises(ValueError, match="padding_side"):
        collate(samples, 0, padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)
    with pytest.raises(ValueError, match="labels has 1"):
        collate([{"input_ids": [1, 2], "labels": [1]}], 0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        collate([{"input_ids": [1], "labels": [1], "pixel_values": torch.zeros(1, 3, 2, 2)}], 0)
    with pytest.raises(ValueError, match="differs"):
        collate([samples[0], {"input_ids": [4], "labels": [-100], "pixel_values": torch.zeros(3, 4, 4)}], 0)
    with pytest.raises(ValueError, match="holds no image tokens"):
        collate([{"input_ids": [1], "labels": [1], "pixel_values": img}], 0, image_token_id=4)
    with pytest.raises(ValueError, match="lacks pixel_values"):
        collate([{"input_ids": [4], "labels": [-100]}], 0, image_token_id=4)


def test_tokenizer_prepare_adds_records_and_refuses_overwrites(tmp_path, capsys):
    from jobs.cli import main

    src = tmp_path / "vicuna"
    PreTrainedTokenizerFast(tokenizer_object=_bare_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False)),
                            unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(src)
    from dpn.tokenizer import TOKENS_FILE, check_prepared

    assert any("<image> is not one token" in p for p in check_prepared(src, router_token=False))
    out = tmp_path / "prepared"
    assert main(["tokenizer", "prepare", "--from", str(src), "--out", str(out), "--router-token"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = load_tokenizer(out)
    assert record["image_token_id"] == tok.convert_tokens_to_ids("<image>")
    assert record["router_token_id"] == tok.convert_tokens_to_ids("<ROUTER>") == record["vocab_size"] - 2
    assert record["pad_token_id"] == tok.pad_token_id and record["added"] == 3
    assert json.loads((out / TOKENS_FILE).read_text()) == record
    assert check_prepared(out, router_token=True) == []
    # again, same way: left as is; another way (no router token) into the same dir: refused, exit 2
    assert main(["tokenizer", "prepare", "--from", str(src), "--out", str(out), "--router-token"]) == 0
    assert main(["tokenizer", "prepare", "--from", str(src), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    # without --router-token there is no <ROUTER>
    plain = tmp_path / "plain"
    assert main(["tokenizer", "prepare", "--from", str(src), "--out", str(plain)]) == 0
    assert "<ROUTER>" not in load_tokenizer(plain).get_vocab()
    assert any("<ROUTER> is not one token" in p for p in check_prepared(plain, router_token=True))
    assert main(["tokenizer", "prepare", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
