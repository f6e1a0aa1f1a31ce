"""`dpn preprocess` (Ray Data) and the training loader: planted faults are quarantined with the right reason,
awkward-but-valid records all reach the shards with the tokens and labels the templates give, re-runs are
no-ops, changed inputs get new shards, micro-batches are modality-pure and deterministic."""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dpn.constants import IGNORE_INDEX
from dpn.conversation import tokenize_conversation
from dpn.image_processing import build_image_processor, preprocess_images
from dpn.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from pipelines.data.annotations import scan_annotations_file
from pipelines.data.loader import iter_micro_batches, open_shards, read_quarantine, read_shards
from pipelines.data.preprocess import PreprocessConfig, fingerprint_inputs, plan_blocks, preprocess
from pipelines.data.records import QUARANTINE_REASONS, RecordProcessor

IMAGE_SIZE, N_IMG_TOK = 16, 16


@pytest.fixture(scope="module")
def ray_session():
    """One Ray instance for this module's tests (reused when the session already has one)."""
    import ray

    from pipelines.data.preprocess import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(2)
    yield ray
    if started:
        ray.shutdown()


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _write_images(images: Path) -> None:
    _save(_noise((64, 48), 0), images / "coco" / "rgb.png", "PNG")
    _save(Image.new("CMYK", (40, 30), (0, 200, 255, 10)), images / "cmyk.jpg", "JPEG")
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (6, 6, 18, 18))
    _save(pal, images / "palette.png", "PNG", transparency=0)
    _save(Image.new("L", (30, 30), 77), images / "gray.png", "PNG")
    _save(_noise((400, 20), 1), images / "wide.png", "PNG")
    _save(Image.new("RGBA", (20, 20), (10, 200, 30, 128)), images / "rgba.png", "PNG")
    (images / "corrupt.jpg").write_bytes(random.Random(0).randbytes(2000))
    buf = io.BytesIO()
    _noise((64, 64), 2).save(buf, format="JPEG", quality=95)
    (images / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _save(_noise((3, 3), 3), images / "tiny.png", "PNG")
    _save(_noise((400, 300), 4), images / "big.png", "PNG")
    _save(_noise((16, 16), 5), images.parent / "outside.png", "PNG")  # exists, but outside the root


Q = "<image>\nWhat is shown?"
# (record, expected reason or None). The record index is the position in this list.
CASES: list[tuple[object, str | None]] = [
    ({"id": "dup-1", "image": "coco/rgb.png", "conversations": _turns(Q, "Noise.", "Any colour?", "Many.")}, None),
    ({"id": "cmyk", "image": "cmyk.jpg", "conversations": _turns(Q, "A CMYK image.")}, None),
    ({"id": "pal", "image": "palette.png", "conversations": _turns(Q, "A red square.")}, None),
    ({"id": "gray", "image": "gray.png", "conversations": _turns(Q, "Gray.")}, None),
    ({"id": "wide", "image": "wide.png", "conversations": _turns(Q, "A very wide strip.")}, None),
    # LCS-558K puts <image> at the end of the human turn.
    ({"id": "end", "image": "coco/rgb.png", "conversations": _turns("Describe the picture.\n<image>", "Noise.")}, None),
    ({"id": "text", "conversations": _turns("What is 2 plus 3?", "5", "And 1 plus 1?", "2")}, None),
    ({"id": "uni", "image": "rgba.png", "conversations": _turns("<image>\nWas ist das? 日本語 — café 🙂",
                                                                "Ein grünes Quadrat, très bien ✓.")}, None),
    # Same id as record 0 (as COCO ids recur across mix665K sub-datasets): both kept.
    ({"id": "dup-1", "image": "coco/rgb.png", "conversations": _turns(Q, "Random pixels.")}, None),
    ({"id": "dup-1", "conversations": _turns("Say hi.", "Hi.")}, None),
    # A leading gpt turn is dropped, as LLaVA does.
    ({"id": "lead", "conversations": [{"from": "gpt", "value": "Hello!"}] + _turns("Hi?", "Hello.")}, None),
    ({"id": 12345, "image": "gray.png", "conversations": _turns("<image>\nColour?", "Gray.")}, None),
    # ---- planted faults
    ({"id": "missing", "image": "nope/none.jpg", "conversations": _turns(Q, "x")}, "image_missing"),
    ({"id": "corrupt", "image": "corrupt.jpg", "conversations": _turns(Q, "x")}, "image_corrupt"),
    ({"id": "trunc", "image": "trunc.jpg", "conversations": _turns(Q, "x")}, "image_corrupt"),
    ({"id": "escape", "image": "../outside.png", "conversations": _turns(Q, "x")}, "image_outside_root"),
    ({"id": "abs", "image": "/etc/hostname", "conversations": _turns(Q, "x")}, "image_outside_root"),
    ({"id": "roles", "image": "gray.png", "conversations": [{"from": "human", "value": Q},
                                                            {"from": "human", "value": "again"}]}, "bad_roles"),
    ({"id": "empty", "image": "gray.png", "conversations": []}, "empty_conversation"),
    ("just a string", "not_object"),
    ([1, 2, 3], "not_object"),
    (None, "not_object"),
    ({"id": "img-in-gpt", "image": "gray.png", "conversations": _turns(Q, "see <image>")}, "image_placement"),
    ({"id": "no-img-tok", "image": "gray.png", "conversations": _turns("What?", "x")}, "image_placement"),
    ({"id": "text-img", "conversations": _turns("<image>\nWhat?", "x")}, "image_placement"),
    ({"id": "no-conv", "image": "gray.png"}, "bad_schema"),
    ({"id": "img-int", "image": 5, "conversations": _turns(Q, "x")}, "bad_schema"),
    ({"id": "eos", "conversations": _turns("Say </s> now", "x")}, "special_token_in_text"),
    ({"id": "blank", "conversations": _turns("Hi?", "   ")}, "empty_turn"),
    ({"id": "odd", "conversations": _turns("Hi?", "Hello.", "Bye?")}, "bad_roles"),
    ({"id": "sys", "conversations": [{"from": "system", "value": "x"}] + _turns("Hi?", "x")}, "bad_roles"),
    ({"id": "tiny", "image": "tiny.png", "conversations": _turns(Q, "x")}, "image_too_small"),
    ({"id": "big", "image": "big.png", "conversations": _turns(Q, "x")}, "image_too_large"),
    ({"id": "long", "conversations": _turns("Tell a story.", " ".join(["word"] * 300))}, "too_long"),
    ({"image": "gray.png", "conversations": _turns(Q, "x")}, "bad_schema"),
    ({"id": "no-value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "bad_schema"),
]
VALID = [i for i, (_, reason) in enumerate(CASES) if reason is None]
LIMITS = dict(min_image_side=4, max_image_pixels=100_000, max_length=200)


def _texts(records) -> list[str]:
    out = []
    for r in records:
        if isinstance(r, dict):
            out += [t.get("value", "") for t in r.get("conversations") or [] if isinstance(t, dict)]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pp")
    _write_images(root / "images")
    records = [r for r, _ in CASES]
    (root / "ann.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:")
    tok = train_tokenizer(_texts(records) * 3 + [system] * 5, vocab_size=400)
    tok.save_pretrained(str(root / "tok"))
    return root


def _cfg(corpus: Path, out: Path, **kw) -> PreprocessConfig:
    base = dict(annotations=str(corpus / "ann.json"), image_root=str(corpus / "images"), tokenizer=str(corpus / "tok"),
                template="vicuna_v1", out=str(out), image_size=IMAGE_SIZE, num_image_tokens=N_IMG_TOK,
                add_router_token=True, rows_per_shard=8, **LIMITS)
    base.update(kw)
    return PreprocessConfig(**base)


@pytest.fixture(scope="module")
def run(ray_session, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = preprocess(_cfg(corpus, out))
    return summary, out


def _rows(path: str) -> dict[int, dict]:
    info = open_shards(path)
    table = pa.concat_tables([pq.read_table(f) for f in info.files])
    return {r["index"]: r for r in table.to_pylist()}


def test_every_valid_record_in_shards_every_fault_quarantined_with_its_reason(run):
    summary, _ = run
    expected = Counter(reason for _, reason in CASES if reason)
    assert summary.rows_in == len(CASES)
    assert summary.rows_out == len(VALID)
    assert summary.quarantined == dict(expected)
    assert set(summary.quarantined) <= set(QUARANTINE_REASONS)
    assert summary.shards == len(open_shards(summary.path).files) >= 2  # rows_per_shard=8 -> several shards
    assert sorted(_rows(summary.path)) == VALID
    q = read_quarantine(summary.path).to_pylist()
    assert {r["index"]: r["reason"] for r in q} == {i: reason for i, (_, reason) in enumerate(CASES) if reason}
    by_index = {r["index"]: r for r in q}
    assert by_index[19]["id"] is None and "str" in by_index[19]["detail"]  # not an object: no id
    assert by_index[12]["id"] == "missing" and "none.jpg" in by_index[12]["detail"]
    # The summary is the last stdout line of the CLI: one JSON object with the fields.
    line = json.loads(summary.to_json())
    for key in ("rows_in", "rows_out", "quarantined", "shards", "fingerprint", "seconds", "rows_per_s"):
        assert key in line


def test_shards_read_back_equal_the_templates_tokens_and_labels(run, corpus):
    summary, _ = run
    tok = load_tokenizer(corpus / "tok")
    rows = _rows(summary.path)
    for i in VALID:
        record = CASES[i][0]
        has_image = "image" in record
        want = tokenize_conversation(record["conversations"], tok, "vicuna_v1", num_image_tokens=N_IMG_TOK,
                                     has_image=has_image, add_router_token=True)
        row = rows[i]
        assert row["input_ids"] == want.input_ids and row["labels"] == want.labels, f"record {i}"
        assert row["length"] == len(want.input_ids)
        assert row["modality"] == ("image" if has_image else "text")
        assert row["id"] == str(record["id"])
        if has_image:
            assert row["image_bytes"] == (corpus / "images" / record["image"]).read_bytes()
            assert row["input_ids"].count(tok.convert_tokens_to_ids("<image>")) == N_IMG_TOK
            assert row["input_ids"].count(tok.convert_tokens_to_ids("<ROUTER>")) == len(record["conversations"]) // 2
        else:
            assert row["image_bytes"] is None and row["image"] is None
            assert tok.convert_tokens_to_ids("<ROUTER>") not in row["input_ids"]  # router only with an image
        assert any(label != IGNORE_INDEX for label in row["labels"])
    # Awkward images: original mode and geometry recorded.
    assert (rows[1]["image_mode"], rows[1]["image_format"]) == ("CMYK", "JPEG")
    assert rows[2]["image_mode"] == "P" and rows[3]["image_mode"] == "L" and rows[7]["image_mode"] == "RGBA"
    assert (rows[4]["image_width"], rows[4]["image_height"]) == (400, 20)
    # Duplicate ids all kept, as separate rows.
    assert sorted(i for i, r in rows.items() if r["id"] == "dup-1") == [0, 8, 9]
    assert rows[11]["id"] == "12345"


def test_rerun_is_a_noop_and_changed_input_gets_new_shards(run, corpus, tmp_path):
    summary, out = run
    files = sorted(Path(summary.path).rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = preprocess(_cfg(corpus, out))
    assert again.reused and again.fingerprint == summary.fingerprint and again.path == summary.path
    assert again.rows_per_s is None and again.quarantined == summary.quarantined
    assert sorted(Path(summary.path).rglob("*")) == files and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert (out / "LATEST").read_text().strip() == summary.fingerprint

    # The same content under another path is the same input.
    copy = tmp_path / "copy.json"
    copy.write_bytes((corpus / "ann.json").read_bytes())
    assert preprocess(_cfg(corpus, out, annotations=str(copy))).reused

    # A changed record -> a new fingerprint and directory; the old shards stay as they were.
    records = [r for r, _ in CASES]
    records[0] = {**records[0], "conversations": _turns(Q, "Changed answer.", "Any colour?", "Many.")}
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    new = preprocess(_cfg(corpus, out, annotations=str(changed)))
    assert not new.reused and new.fingerprint != summary.fingerprint and new.path != summary.path
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert (out / "LATEST").read_text().strip() == new.fingerprint
    assert open_shards(out).fingerprint == new.fingerprint  # the root resolves to the latest run

    # Options that shape rows are part of the fingerprint; so is every referenced image.
    fp_router = fingerprint_inputs(_cfg(corpus, out, add_router_token=False))[0]
    assert fp_router != summary.fingerprint
    img = corpus / "images" / "gray.png"
    before = img.stat()
    try:
        Image.new("L", (30, 30), 78).save(img)
        assert fingerprint_inputs(_cfg(corpus, out))[0] != summary.fingerprint
    finally:
        Image.new("L", (30, 30), 77).save(img)
        os.utime(img, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fingerprint_inputs(_cfg(corpus, out))[0] == summary.fingerprint


def test_plain_template_takes_lcs_records(ray_session, corpus, tmp_path):
    records = [
        {"id": "a", "image": "coco/rgb.png", "conversations": _turns("Describe.\n<image>", "Noise on a grid.")},
        {"id": "b", "image": "wide.png", "conversations": _turns("<image>\nSummarize.", "A strip.")},
        {"id": "c", "image": "gray.png", "conversations": _turns(Q, "Gray.", "More?", "No.")},
        {"id": "d", "conversations": _turns("Hi?", "Hello.")},
    ]
    ann = tmp_path / "lcs.json"
    ann.write_text(json.dumps(records), encoding="utf-8")
    s = preprocess(_cfg(corpus, tmp_path / "out", annotations=str(ann), template="plain", add_router_token=False))
    assert (s.rows_out, s.quarantined) == (2, {"template_mismatch": 2})
    tok = load_tokenizer(corpus / "tok")
    rows = _rows(s.path)
    for i in (0, 1):
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        # plain: bos, the image tokens (human text dropped), then the caption + "\n", supervised.
        assert ids[:1 + N_IMG_TOK] == [tok.bos_token_id] + [tok.convert_tokens_to_ids("<image>")] * N_IMG_TOK
        assert labels[:1 + N_IMG_TOK] == [IGNORE_INDEX] * (1 + N_IMG_TOK)
        assert tok.decode(ids[1 + N_IMG_TOK:]) == records[i]["conversations"][1]["value"] + "\n"
        assert labels[1 + N_IMG_TOK:] == ids[1 + N_IMG_TOK:]


def _mismatch_tokenizer(path: Path) -> None:
    """A byte-level BPE without the word-splitting regex: it learns ':Ġ' merges that straddle the
    'ASSISTANT:' / answer boundary, the tokenization mismatch LLaVA warns about."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["USER: hi ASSISTANT: yes</s>"] * 50, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", extra_special_tokens=["<image>", "<ROUTER>"]).save_pretrained(str(path))


def test_tokenization_mismatch_is_quarantined_not_silent(ray_session, corpus, tmp_path):
    _mismatch_tokenizer(tmp_path / "tok")
    ann = tmp_path / "m.json"
    ann.write_text(json.dumps([{"id": "m", "conversations": _turns("hi", "yes")}]), encoding="utf-8")
    s = preprocess(_cfg(corpus, tmp_path / "out", annotations=str(ann), tokenizer=str(tmp_path / "tok")))
    assert (s.rows_out, s.quarantined) == (0, {"tokenization_mismatch": 1})
    assert s.shards == 0 and read_quarantine(s.path).column("reason").to_pylist() == ["tokenization_mismatch"]


def test_an_unexpected_error_quarantines_the_record_instead_of_crashing(corpus, monkeypatch):
    import dpn.conversation

    def boom(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    proc = RecordProcessor(tokenizer=load_tokenizer(corpus / "tok"), template="vicuna_v1", num_image_tokens=4,
                           add_router_token=False, image_root=corpus / "images", image_storage="bytes",
                           min_image_side=1, max_image_side=100, max_image_pixels=10_000, max_length=None)
    monkeypatch.setattr(dpn.conversation, "tokenize_conversation", boom)
    row, q = proc.process(7, CASES[6][0])
    assert row is None and q["reason"] == "internal_error" and "tokenizer exploded" in q["detail"]
    assert (q["index"], q["id"]) == (7, "text")


def test_bad_inputs_fail_eagerly_with_what_is_valid(corpus, tmp_path):
    with pytest.raises(ValueError, match="template must be one of"):
        _cfg(corpus, tmp_path, template="vicuna_v2")
    with pytest.raises(ValueError, match="is not a file"):
        _cfg(corpus, tmp_path, annotations=str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="image_storage must be one of"):
        _cfg(corpus, tmp_path, image_storage="jpeg")
    with pytest.raises(ValueError, match="max_length"):
        _cfg(corpus, tmp_path, max_length=N_IMG_TOK)
    lines = tmp_path / "lines.json"
    lines.write_text('{"id": 1}\n{"id": 2}\n')
    with pytest.raises(ValueError, match="one JSON array"):
        scan_annotations_file(lines)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1}, {"id": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        scan_annotations_file(broken)


# Array elements whose text holds every byte the splitter must not take for structure: commas and
# brackets inside strings, escaped quotes after odd and even backslash runs, nested arrays/objects,
# multi-byte UTF-8, whitespace between elements.
TRICKY = [
    '{"id": "a,b", "conversations": [{"from": "human", "value": "x]\\"[, }{"}]}',
    '"\\\\"',  # a string holding one backslash: the quote after \\ is a real one
    '"\\\\\\"],"',  # backslash, escaped quote, ], comma: all inside the string
    '[[1, [2, {"k": [3, "]"]}]], {}]',
    '{"id": 7, "v": "h\u00e9\u00e9 \u2603 \u00e9t\u00e9, [ok]"}',
    '{"id": "\u00e9t\u00e9", "conversations": []}',
    '-1.5e3',
    'null',
]


def test_array_splitter_finds_the_separators_whatever_the_chunking(tmp_path):
    text = "[" + ",\n ".join(TRICKY) + " ]"
    # The separators, from how the text was built: '[' at 0, each ',' after an element, then the ']'.
    expected, pos = [0], 1
    for element in TRICKY[:-1]:
        pos += len(element.encode())
        expected.append(pos)
        pos += len(",\n ")
    expected.append(len(text.encode()) - 1)
    data = text.encode()
    assert [data[i] for i in expected] == [ord("[")] + [ord(",")] * (len(TRICKY) - 1) + [ord("]")]
    from pipelines.data.annotations import ArraySplitter

    for chunk in (1, 2, 3, 5, 8, 13, len(data)):
        splitter = ArraySplitter()
        for i in range(0, len(data), chunk):
            splitter.feed(data[i:i + chunk])
        assert splitter.separators().tolist() == expected, chunk
    path = tmp_path / "tricky.json"
    path.write_bytes(data)
    scan = scan_annotations_file(path)
    assert scan.count == len(TRICKY) and scan.separators.tolist() == expected
    assert scan.images == []
    # Each record's byte range parses back to exactly that record.
    for i, element in enumerate(TRICKY):
        assert json.loads(data[expected[i] + 1:expected[i + 1]]) == json.loads(element)
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] ")
    assert scan_annotations_file(empty).count == 0 and scan_annotations_file(empty).separators.tolist() == [1, 3]


def test_blocks_shrink_towards_the_end_and_cover_every_record():
    # Each block takes a quarter (1 / (2 * 2 CPUs)) of the records left, between 32 and max_rows.
    assert plan_blocks(2400, 2, 1024)[:4] == [600, 450, 338, 253]  # 2400/4, 1800/4, 1350/4 up, 1012/4 up
    assert plan_blocks(100, 2, 1024) == [32, 32, 32, 4]
    assert plan_blocks(20, 2, 8) == [8, 8, 4]
    assert plan_blocks(0, 2, 8) == []
    big = plan_blocks(665_000, 2, 1024)
    assert sum(big) == 665_000 and max(big) == 1024 and big[-2:] == [32, 13]
    with pytest.raises(ValueError, match="cpus"):
        plan_blocks(10, 0, 8)


def _batches(rows, info, **kw):
    base = dict(micro_batch_size=3, seed=0, epoch=0, megabatch_factor=2, window_rows=64, return_index=True)
    base.update(kw)
    return list(iter_micro_batches(rows, info, **base))


def test_loader_yields_modality_pure_deterministic_micro_batches(run, ray_session):
    summary, _ = run
    info = open_shards(summary.path)
    ds = read_shards(info)
    batches = _batches(ds, info)
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == VALID  # every row exactly once
    rows = _rows(summary.path)
    for b in batches:
        kinds = {rows[i]["modality"] for i in b["index"].tolist()}
        assert len(kinds) == 1
        if kinds == {"image"}:
            assert b["pixel_values"].shape == (len(b["index"]), 3, IMAGE_SIZE, IMAGE_SIZE)
            assert b["pixel_values"].dtype == torch.float32
        else:
            assert "pixel_values" not in b
        for k, i in enumerate(b["index"].tolist()):
            n = rows[i]["length"]
            assert b["input_ids"][k, :n].tolist() == rows[i]["input_ids"]
            assert b["labels"][k, :n].tolist() == rows[i]["labels"]
            assert b["attention_mask"][k].sum().item() == n
            assert (b["labels"][k, n:] == IGNORE_INDEX).all() and (b["input_ids"][k, n:] == info.pad_token_id).all()
    # Deterministic for (seed, epoch), whatever the row order within the window; another epoch reshuffles.
    table = pa.concat_tables([pq.read_table(f) for f in info.files])
    reversed_rows = table.take(pa.array(list(range(table.num_rows))[::-1]))
    again = _batches(reversed_rows, info)
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in batches]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, batches, strict=True))
    # A DataIterator (what ray.train.get_dataset_shard returns in a worker) gives the same batches.
    via_iterator = _batches(ds.iterator(), info)
    assert [b["index"].tolist() for b in via_iterator] == [b["index"].tolist() for b in batches]
    other = _batches(ds, info, epoch=1)
    assert [b["index"].tolist() for b in other] != [b["index"].tolist() for b in batches]
    assert sorted(torch.cat([b["index"] for b in other]).tolist()) == VALID
    # drop_last keeps only full micro-batches.
    assert all(len(b["index"]) == 3 for b in _batches(ds, info, drop_last=True))
    # Per-worker file split: disjoint and complete.
    parts = [read_shards(info, rank=r, world_size=2).select_columns(["index"]).take_all() for r in (0, 1)]
    idx = [{row["index"] for row in p} for p in parts]
    assert not idx[0] & idx[1] and sorted(idx[0] | idx[1]) == VALID


def test_length_grouping_cuts_padding_and_windows_lose_no_row(run):
    from pipelines.data.records import SHARD_SCHEMA

    info = open_shards(run[0].path)
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(200)]
    table = pa.Table.from_pylist(
        [{"index": i, "id": "t", "modality": "text", "length": n, "input_ids": [7] * n, "labels": [7] * n}
         for i, n in enumerate(lengths)], schema=SHARD_SCHEMA)

    def run_batches(**kw):
        return _batches(table, info, micro_batch_size=4, megabatch_factor=4, window_rows=64, **kw)

    def padding(batches) -> int:
        return sum(int((1 - b["attention_mask"]).sum()) for b in batches)

    grouped, plain = run_batches(), run_batches(group_by_length=False)
    assert padding(grouped) * 2 < padding(plain)
    for batches in (grouped, plain):  # windows of 64 rows, leftovers carried: every row once, one partial at most
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(200))
        assert sum(len(b["index"]) < 4 for b in batches) <= 1


def test_loader_pixels_from_bytes_equal_stored_pixels_and_the_eval_path(ray_session, run, corpus, tmp_path):
    summary, _ = run
    px = preprocess(_cfg(corpus, tmp_path / "px", image_storage="pixels"))
    assert px.fingerprint != summary.fingerprint and px.rows_out == summary.rows_out
    info_b, info_p = open_shards(summary.path), open_shards(px.path)
    from_bytes = {tuple(b["index"].tolist()): b for b in _batches(read_shards(info_b), info_b)}
    from_pixels = {tuple(b["index"].tolist()): b for b in _batches(read_shards(info_p), info_p)}
    assert from_bytes.keys() == from_pixels.keys()
    for key, b in from_bytes.items():
        assert torch.equal(b["input_ids"], from_pixels[key]["input_ids"])
        if "pixel_values" in b:
            assert torch.equal(b["pixel_values"], from_pixels[key]["pixel_values"])
    # ... and both equal what evaluation computes from the file on disk.
    processor = build_image_processor(IMAGE_SIZE)
    key = next(k for k, b in from_bytes.items() if "pixel_values" in b)
    files = [corpus / "images" / CASES[i][0]["image"] for i in key]
    want = preprocess_images([Image.open(f) for f in files], processor)
    assert torch.equal(from_bytes[key]["pixel_values"], want)


def test_cli_prints_the_summary_last(ray_session, corpus, tmp_path, capsys):
    from jobs.cli import main

    argv = ["preprocess", "--annotations", str(corpus / "ann.json"), "--image-root", str(corpus / "images"),
            "--tokenizer", str(corpus / "tok"), "--template", "vicuna_v1", "--out", str(tmp_path / "o"),
            "--config", "test-tiny", "--router-token", "--max-length", "200"]
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Default size limits: the 3x3 and the 400x300 images pass.
    assert (last["rows_in"], last["rows_out"]) == (len(CASES), len(VALID) + 2)
    assert last["quarantined"]["image_corrupt"] == 2 and "image_too_small" not in last["quarantined"]
    assert len(last["fingerprint"]) == 24 and last["shards"] >= 1 and last["rows_per_s"] > 0
    bad = argv.copy()
    bad[2] = str(tmp_path / "absent.json")
    assert main(bad) == 2
    assert "is not a file" in capsys.readouterr().err


def test_fifo_bomb_symlink_out_of_root_and_bad_text_are_quarantined_in_bounded_time(ray_session, corpus, tmp_path):
    """The issue's hostile corpus: a FIFO (an open() would block forever), a 100-megapixel PNG (a
    decompression bomb for the default pixel cap), a symlink leading out of the image root, a record with
    an invalid UTF-8 byte and one with a lone surrogate, behind a UTF-8 BOM. Each is quarantined with its
    reason; every good record is kept."""
    import time

    images = tmp_path / "images"
    _save(_noise((24, 24), seed=2), images / "good.png", "PNG")
    os.mkfifo(images / "fifo.png")
    _save(Image.new("1", (10_000, 10_000)), images / "bomb.png", "PNG")  # 1 bit/pixel: a ~12 KB file
    _save(_noise((24, 24), seed=3), tmp_path / "outside" / "secret.png", "PNG")
    (images / "escape.png").symlink_to(tmp_path / "outside" / "secret.png")

    def rec(rid: str, image: str) -> bytes:
        return json.dumps({"id": rid, "image": image, "conversations": _turns(Q, "Noise.")}).encode()

    bad_byte = rec("bad-byte", "good.png").replace(b"Noise.", b"Noi\xffse.")
    surrogate = rec("surrogate", "good.png").replace(b"Noise.", b"Noi\\ud800se.")
    records = [rec("good-1", "good.png"), rec("fifo", "fifo.png"), rec("bomb", "bomb.png"),
               rec("escape", "escape.png"), bad_byte, surrogate, rec("good-2", "good.png")]
    ann = tmp_path / "ann.json"
    ann.write_bytes(b"\xef\xbb\xbf[" + b",\n".join(records) + b"]")

    t0 = time.time()
    summary = preprocess(_cfg(corpus, tmp_path / "out", annotations=str(ann), image_root=str(images),
                              max_image_pixels=89_478_485))
    assert time.time() - t0 < 120  # bounded: nothing blocked on the FIFO or decoded the bomb
    assert summary.rows_in == 7 and summary.rows_out == 2
    q = {r["id"] or r["index"]: r for r in read_quarantine(summary.path).to_pylist()}
    assert {k: r["reason"] for k, r in q.items()} == {
        "fifo": "image_not_regular", "bomb": "image_too_large", "escape": "image_outside_root",
        4: "bad_text", 5: "bad_text"}  # a record that does not decode has no readable id
    assert "FIFO" in q["fifo"]["detail"] and "100000000 pixels" in q["bomb"]["detail"]
    assert "outside the image root" in q["escape"]["detail"]
    assert sorted(r["id"] for r in _rows(summary.path).values()) == ["good-1", "good-2"]

    # The operator's switch: a symlink out of the root (`coco -> /data/coco`) is read.
    allowed = preprocess(_cfg(corpus, tmp_path / "out2", annotations=str(ann), image_root=str(images),
                              max_image_pixels=89_478_485, follow_symlinks_outside_root=True))
    assert allowed.rows_out == 3 and "image_outside_root" not in allowed.quarantined
