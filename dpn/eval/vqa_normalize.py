"""Answer normalisation and the VQA soft accuracy, as the official tools behind LLaVA-1.5's numbers do it.

Three consumers, three slightly different pipelines (all reimplemented here from the published rules):

- **EvalAI answer processor** (`evalai_normalize`): what LLaVA's `convert_vqav2_for_submission.py` and
  `convert_vizwiz_for_submission.py` apply to every prediction before upload, and what the m4c TextVQA
  evaluator applies to predictions *and* annotator answers. Lower-cases, deletes `,` and `?`, splits
  `'s`, then punctuation, number words, articles and contractions (below).
- **Official VQA evaluation** (`vqa_accuracy`, GT-Vision-Lab `vqaEval.py`, the version after "Fixed
  processing answers bug"): answers are only stripped; *only when the annotators disagree*
  (`len(set(answers)) > 1`) are the prediction and every annotator answer passed through punctuation
  and digit/article processing. The official punctuation step differs from EvalAI's in one regex: the
  "comma between digits" test is `digit , digit` instead of `digit ,+ digit`.
- **Official VizWiz evaluation** (`vizwiz_accuracy`): the prediction is always processed, the
  annotator answers are compared raw. (The VizWiz server's contraction table spells apostrophes as
  U+2019; that cannot change a prediction the EvalAI processor already expanded, so one table serves.)

Score of one prediction against n annotator answers (the "10 choose 9" leave-one-out average):
    acc = mean over i of min(1, #{j != i : answer_j == prediction} / 3)
so with 10 annotators, k matching answers give 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >=4.
"""

from __future__ import annotations

import re

# Contraction table of the official VQA evaluation (identical, entry for entry, in the EvalAI
# processor). Applied per whitespace token after lower-casing, so the capitalised keys never fire;
# kept for fidelity, as is the odd "somebody'd" -> "somebodyd".
CONTRACTIONS: dict[str, str] = {
    "'ow'sat": "'ow's'at", "'ows'at": "'ow's'at", "I'dve": "I'd've", "Id've": "I'd've", "Im": "I'm",
    "Ive": "I've", "aint": "ain't", "arent": "aren't", "cant": "can't", "couldn'tve": "couldn't've",
    "couldnt": "couldn't", "couldnt've": "couldn't've", "couldve": "could've", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadn'tve": "hadn't've", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "he'dve": "he'd've", "hed": "he'd",
    "hed've": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "it'dve": "it'd've", "itd": "it'd", "itd've": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightn'tve": "mightn't've", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "shant": "shan't", "she'dve": "she'd've", "she's": "she's",
    "shed've": "she'd've", "shouldn'tve": "shouldn't've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldve": "should've", "somebody'd": "somebodyd",
    "somebody'dve": "somebody'd've", "somebodyd've": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someone'dve": "someone'd've", "someoned": "someone'd",
    "someoned've": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "something'dve": "something'd've", "somethingd": "something'd", "somethingd've": "something'd've",
    "somethingll": "something'll", "thats": "that's", "there'dve": "there'd've", "thered": "there'd",
    "thered've": "there'd've", "therere": "there're", "theres": "there's", "they'dve": "they'd've",
    "theyd": "they'd", "theyd've": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "we'dve": "we'd've", "wed've": "we'd've",
    "werent": "weren't", "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "who'dve": "who'd've", "whod": "who'd", "whod've": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldn'tve": "wouldn't've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldve": "would've", "y'all'dve": "y'all'd've",
    "y'alld've": "y'all'd've", "y'allll": "y'all'll", "yall": "y'all", "yall'd've": "y'all'd've",
    "yall'll": "y'all'll", "you'dve": "you'd've", "youd": "you'd", "youd've": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

# Number words map to digits (and "none" to "0", which is why "none" answers count as "0").
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Characters removed (or turned into a space, see `process_punctuation`). `'` and `:` are absent, so
# "don't" survives; `.` is handled separately so that "2.5" survives.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

# A period not followed by a digit. (The originals write `(?!<=\d)(\.)(?!\d)`: the first group is a
# look-*ahead* for the text "<=digit", which can never match at a ".", so it is a no-op.)
_PERIOD = re.compile(r"\.(?!\d)")
# The originals pass `re.UNICODE` (== 32) as the third positional argument of `Pattern.sub`, which is
# `count`: at most 32 periods are removed. Reproduced so that pathological answers score identically.
_PERIOD_MAX_REMOVALS = 32

# "Is there a comma between digits anywhere?" decides whether punctuation is deleted or spaced out.
EVALAI_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
OFFICIAL_DIGIT_COMMA = re.compile(r"\d,\d")


def process_punctuation(text: str, digit_comma: re.Pattern[str] = OFFICIAL_DIGIT_COMMA) -> str:
    """Delete each punctuation mark when it touches a space (or the text has a digit comma anywhere),
    otherwise replace it by a space; then drop periods not followed by a digit.

    The touch test looks at the *input* text, not the partially processed one, as the originals do:
    "a-b" -> "a b", "a - b" -> "a  b", "1,000" -> "1000".
    """
    delete_all = digit_comma.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVALS)


def process_digit_article(text: str) -> str:
    """Lower-case, map number words to digits, drop articles, expand contractions; single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(answer: str) -> str:
    """The EvalAI answer processor (mmf `EvalAIAnswerProcessor`), as LLaVA uses it.

    >>> evalai_normalize("Two dogs.")
    '2 dogs'
    >>> evalai_normalize("The cat's toy, 1,000!")
    "cat 's toy 1000"
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text, EVALAI_DIGIT_COMMA)
    return process_digit_article(text)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def leave_one_out_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the n leave-one-out subsets of min(1, matches among the other n-1 answers / 3), in [0, 1]."""
    if not answers:
        raise ValueError("leave_one_out_accuracy needs at least one annotator answer")
    matches = sum(a == prediction for a in answers)
    total = 0.0
    for a in answers:
        # Leaving out answer i removes one match exactly when answer i itself matches.
        others = matches - (a == prediction)
        total += min(1.0, others / 3.0)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA (v2) accuracy of one prediction, in [0, 1]. Feed it the EvalAI-normalised
    prediction to reproduce LLaVA's VQAv2 submissions."""
    pred = _clean_whitespace(prediction)
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    return leave_one_out_accuracy(pred, gts)


def vizwiz_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VizWiz accuracy of one prediction, in [0, 1]: processed prediction vs raw answers."""
    pred = process_digit_article(process_punctuation(_clean_whitespace(prediction)))
    return leave_one_out_accuracy(pred, list(answers))


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """m4c TextVQA accuracy of one prediction, in [0, 1]: EvalAI processing on both sides."""
    return leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])
