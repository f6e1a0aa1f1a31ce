"""Document functions of the local lmms-eval tasks in this folder (tests/test_lmms.py)."""

from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]


def doc_to_choice_target(doc):
    return doc["options"].index(doc["answer"])


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
