"""The built-in grounded-relevance benchmark: a seeded generator of queries, notes and gold reasoning.

    python -m data.synthetic --out data/builtin                   # default sizes, seed 0; a few seconds
    python -m data.synthetic --out DIR --seed 1 --sizes sft=500,rl=2000

Version 3 (docs/benchmark.md has the design and the rules of a fair experiment on it): version 2's world, whose
trace names the subject and the category at steps 2 and 3. A closed world mirrors the
paper's setting (PAPER.md): categories with entities, qualifiers, places, brands and models, authors, prices. A
note is drawn first and alone: 8 sentences about three entities of one category (4-5, 2-3 and 1 of them), a title,
a tag, an author and one detail line (style, comparison, list size, how-to, price, place or model). Then the query:
its subject is one of the note's entities or one the note never names, which sets the coverage (large, partial,
mention, none), and its type is one of nine (plain, qualifier, comparison, ranking, question, numeric, place,
product, author); a business rule's case is decided by whether the query's value equals the note's. The rubric
(sam/prompt.py RUBRIC) gives the initial score from coverage, category match and keyword hits; the rule calibrates
it (sam/prompt.py BUSINESS_RULES); the label is the calibrated score, so it needs the query and the note together.
Records are drawn until their label matches one drawn from LABEL_TARGET, per query type. The sft split's traces
come from an imperfect teacher (TEACHER) while every label stays true.

Splits (deterministic per seed and split name, independent of the other splits' sizes): sft (with gold reasoning
traces), rl (label-only), val and test_random (natural distribution: plain queries dominate, business rules rarely
change the score), test_longtail (rare query types dominate and rules change the score often). Every record carries
gold values for every step. Also written: stats.json (distributions, calibration rates, trivial baselines) and
tokenizer/ (a word-level Hugging Face tokenizer over the benchmark's closed vocabulary).
"""

import argparse
import functools
import json
import random
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from data.schema import Record, write_jsonl, write_text_atomic
from data.tokenizer import build_tokenizer, save_tokenizer
from sam.prompt import FORMATS, LABELS, instruction, render_criteria_trace, render_gold_reasoning, render_prompt

# ---------------------------------------------------------------------------------------------------------------
# The world

# One word per entity: a query entity is matched against the note's sentences word for word (multi-word entities
# sharing a word, such as "baby stroller" and "baby bottle", made the match a different task per pair).
CATEGORIES = {
    "food": (
        ["ramen", "hotpot", "dumplings", "boba", "croissant", "sushi", "tacos", "curry", "cheesecake"],
        ["vegan", "spicy", "homemade", "glutenfree", "midnight"],
    ),
    "travel": (
        ["hiking", "resort", "market", "skiing", "roadtrip", "onsen", "cruise"],
        ["budget", "family", "solo", "weekend", "luxury"],
    ),
    "beauty": (
        ["sunscreen", "lipstick", "facemask", "hairdye", "eyeliner", "moisturizer", "perfume"],
        ["waterproof", "natural", "longlasting", "gentle", "mini"],
    ),
    "fitness": (
        ["yoga", "sneakers", "workout", "swimming", "pilates", "weights", "cycling"],
        ["beginner", "lowimpact", "morning", "quick", "advanced"],
    ),
    "tech": (
        ["laptop", "phonecase", "earbuds", "smartwatch", "camera", "keyboard", "tablet"],
        ["wireless", "gaming", "lightweight", "refurbished", "foldable"],
    ),
    "parenting": (
        ["stroller", "snacks", "storybook", "schoolbag", "bottle", "diapers"],
        ["organic", "safe", "portable", "twin", "newborn"],
    ),
    "home": (
        ["sofa", "lamp", "ricecooker", "storage", "curtains", "plantpot", "purifier"],
        ["small", "quiet", "wooden", "modern", "secondhand"],
    ),
    "fashion": (
        ["jacket", "loafers", "coat", "dress", "handbag", "scarf", "boots"],
        ["oversized", "vintage", "black", "linen", "plussize"],
    ),
}
PLACES = ["Chengdu", "Kyoto", "Lisbon", "Seoul", "Bangkok", "Paris", "Hangzhou", "Osaka", "Bali", "Xiamen"]
FIRST_NAMES = ["Mia", "Leo", "Ava", "Max", "Ivy", "Sam", "Zoe", "Ken"]
LAST_NAMES = ["Chen", "Wang", "Liu", "Zhang", "Zhou", "Lin", "Xu", "Guo"]
BRANDS = ["Lumi", "Orca", "Nova", "Kiko", "Terra", "Vela"]
MODELS = ["Pro", "Mini", "Air", "Max", "Lite"]
PRICES = [20, 30, 50, 80, 100]
RANK_SIZES = [3, 5, 10]

QUERY_TYPES = ("plain", "qualifier", "comparison", "ranking", "question", "numeric", "place", "product", "author")
RARE_TYPES = ("comparison", "ranking", "numeric", "author")
# outcome names of each business rule; the first is the default (the rule keeps the score)
# Outcome names of each business rule; the first is the default (the rule keeps the score). Every case is decided
# by comparing one value of the note (its detail line, or its author) with one value of the query, and the note's
# value is drawn before and without the query: a reader of the note alone learns nothing about the case.
CASES = {
    "qualifier": ("kept", "dropped"),
    "comparison": ("both", "one side"),
    "ranking": ("full", "short"),
    "question": ("answered", "not answered"),
    "numeric": ("match", "off"),
    "place": ("guide", "other place"),
    "product": ("details", "other model"),
    "author": ("exact", "partial"),
}
DETAIL_KINDS = tuple(k for k in CASES if k != "author")  # the author rule reads the note's author field instead
QUALIFIERS = sorted({x for _, qualifiers in CATEGORIES.values() for x in qualifiers})
HOWTO = ["choose", "clean", "store", "use"]
DISTRIBUTIONS = {
    "random": {
        "types": dict(
            plain=25, qualifier=15, comparison=5, ranking=5, question=12, numeric=5, place=15, product=12, author=6
        ),
        "case_prob": 0.3,  # chance that a rule's evidence is a non-default case
    },
    "longtail": {
        "types": dict(
            plain=4, qualifier=8, comparison=16, ranking=16, question=8, numeric=16, place=8, product=8, author=16
        ),
        "case_prob": 0.7,
    },
}
# Which entity of the note the query asks about, and so the coverage: every note has one entity in 4-5 of its 8
# sentences (A), one in 2-3 (B) and one in exactly 1 (C); the query names A, B, C or an entity the note never names.
ROLES = {"A": 35, "B": 25, "C": 15, "absent": 25}
COMPOSITIONS = [(4, 2), (4, 3), (5, 2)]  # (sentences about A, about B); C has 1, filler the rest
NUM_SENTENCES = 8
# Every query type's labels follow this distribution (records are drawn until the label matches one drawn from it),
# so the query alone predicts nothing beyond the majority label; business rules that cap or lower the score would
# otherwise give each query type its own label mix.
LABEL_TARGET = {3: 30, 2: 25, 1: 20, 0: 15, -1: 10}
SPLITS = {"sft": "random", "rl": "random", "val": "random", "test_random": "random", "test_longtail": "longtail"}
DEFAULT_SIZES = {"sft": 2000, "rl": 8000, "val": 1000, "test_random": 1000, "test_longtail": 1000}
VERSION = 3  # 3: version 2's world, with steps 2 and 3 of the trace naming the subject and category they judge
DRAWS = 2  # the record streams are named after version 2: version 3 draws the same notes, queries and labels
# The teacher that wrote the warm-up traces (docs/benchmark.md): it has two blind spots, one per
# scored step, and errs on them at these rates. Step 5 (title bias): when the note's title names the query's
# entity and the note only partly covers it (partial or mention), the teacher reads the coverage one level higher.
# Step 6 (missed special case): on a non-default business-rule case the teacher writes the default case and keeps
# the score. The labels of every split stay the truth. Fixed from pre-RL measurements (docs/benchmark.md).
TEACHER = {"initial_error": 0.7, "calibration_error": 0.7, "errors": "independent"}
TEACHER_MODES = ("independent", "correlated", "none")

TOPIC_TEMPLATES = [
    "I loved {s}.",
    "More on {s}.",
    "Friends asked about {s}.",
    "{s} is worth it.",
    "I would pick {s} again.",
    "Tip: plan for {s}.",
    "My notes on {s}.",
    "People get {s} wrong.",
    "A month of {s}.",
    "Saving this {s} post.",
]
FILLER = [
    "Nice weather today.",
    "Thanks for reading.",
    "Follow for more.",
    "Questions welcome.",
    "My cat slept.",
    "Coffee first.",
]
TITLES = ["Notes on {s}", "Thoughts about {s}", "A week of {s}", "{s} diary"]
LEVELS = ("none", "mention", "partial", "large")


def _weighted(rng: random.Random, weights: dict):
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _contains(text: str, phrase: str) -> bool:
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(phrase.lower()) + r"(?![A-Za-z0-9])", text.lower()) is not None


def coverage_level(count: int) -> str:
    """Coverage from the number of the note's 8 sentences about the query entity."""
    return "large" if count >= 4 else "partial" if count >= 2 else "mention" if count == 1 else "none"


def _rubric(coverage: str, category_match: bool, hits: list[str]) -> int:
    if coverage == "large":
        return 3
    if coverage == "partial":
        return 2
    if coverage == "mention":
        return 1
    return 0 if category_match or hits else -1


def _calibrate(qtype: str, case: str | None, initial: int) -> int:
    """The business rule of `qtype` applied to the initial score; defined for every initial score (a rule that
    lowers by one leaves scores below 2 alone, a cap leaves scores under it alone)."""
    if case is None or case == CASES[qtype][0]:
        return initial
    lower = initial - 1 if initial >= 2 else initial
    return {
        ("qualifier", "dropped"): lower,
        ("comparison", "one side"): lower,
        ("ranking", "short"): lower,
        ("question", "not answered"): min(initial, 1),
        ("numeric", "off"): lower,
        ("place", "other place"): min(initial, 0),
        ("product", "other model"): min(initial, 1),
        ("author", "partial"): min(initial, 1),
    }[(qtype, case)]


# ---------------------------------------------------------------------------------------------------------------
# Notes, then the query that makes the wanted coverage: the note's surface never depends on the label


def _make_note(rng: random.Random) -> dict:
    """A note of one category: entities A, B, C in a:b:1 of 8 sentences, the rest filler, shuffled."""
    cat = rng.choice(sorted(CATEGORIES))
    entities, qualifiers = CATEGORIES[cat]
    a, b = rng.choice(COMPOSITIONS)
    A, B, C = rng.sample(entities, 3)
    body = [(A, t) for t in rng.sample(TOPIC_TEMPLATES, a)] + [(B, t) for t in rng.sample(TOPIC_TEMPLATES, b)]
    body += [(C, rng.choice(TOPIC_TEMPLATES))] + [(None, f) for f in rng.sample(FILLER, NUM_SENTENCES - a - b - 1)]
    rng.shuffle(body)
    author = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    return dict(
        category=cat,
        entities={"A": A, "B": B, "C": C},
        counts={A: a, B: b, C: 1},
        author=author,
        sentences=[t.format(s=e) if e else t for e, t in body],
    )


def _detail_value(rng: random.Random, kind: str, note: dict):
    """The value on the note's detail line of `kind`, drawn from a fixed set without looking at the query."""
    if kind == "qualifier":
        return rng.choice(QUALIFIERS)
    if kind == "comparison":
        return rng.choice([x for x in CATEGORIES[note["category"]][0] if x not in note["counts"]])
    if kind == "ranking":
        return rng.choice(RANK_SIZES)
    if kind == "question":
        return rng.choice(HOWTO)
    if kind == "numeric":
        return rng.choice(PRICES)
    if kind == "place":
        return rng.choice(PLACES)
    return rng.choice(BRANDS), rng.choice(MODELS)  # product


def _detail_text(kind: str, v) -> str:
    return {
        "qualifier": lambda: f"Style: {v}.",
        "comparison": lambda: f"Also compared: {v}.",
        "ranking": lambda: f"List: {v} picks.",
        "question": lambda: f"It explains how to {v} it.",
        "numeric": lambda: f"Price: {v} dollars.",
        "place": lambda: f"Place: {v}.",
        "product": lambda: f"Model: {v[0]} {v[1]}.",
    }[kind]()


def _make_query(rng: random.Random, qtype: str, note: dict, role: str, case: str | None, v) -> dict:
    """The query: its subject plays `role` in the note (A, B, C or absent); its rule slot equals the note's value
    `v` (or author) for the default case and differs from it otherwise. Text, keywords and need."""
    if role == "absent":
        # half from the note's category (a near miss: categories match), half from another one; a comparison's two
        # sides share a category, so its absent subject stays in the note's (a mixed pair would tell the role)
        same = qtype == "comparison" or rng.random() < 0.5
        cat = note["category"] if same else rng.choice([c for c in sorted(CATEGORIES) if c != note["category"]])
        e = rng.choice([x for x in CATEGORIES[cat][0] if x not in note["counts"] and x != v])
    else:
        cat, e = note["category"], note["entities"][role]
    keep = case == CASES.get(qtype, (None,))[0]

    def pick(pool, value):  # the note's value for the default case, another one otherwise
        return value if keep else rng.choice([x for x in pool if x != value])

    q = dict(type=qtype, category=cat, entity=e, keywords=[e])
    if qtype == "plain":
        q["text"] = e if rng.random() < 0.5 else f"{e} tips"
    elif qtype == "qualifier":
        w = pick(QUALIFIERS, v)
        q["text"], q["keywords"] = f"{w} {e}", [w, e]
    elif qtype == "comparison":
        other = pick([x for x in CATEGORIES[cat][0] if x not in note["counts"] and x != e], v)
        q["text"], q["keywords"] = f"{e} vs {other}", [e, other]
    elif qtype == "ranking":
        q["text"] = f"top {pick(RANK_SIZES, v)} {e}"
    elif qtype == "question":
        q["text"] = f"how to {pick(HOWTO, v)} {e}"
    elif qtype == "numeric":
        w = pick(PRICES, v)
        q["text"], q["keywords"] = f"{e} around {w} dollars", [e, f"{w} dollars"]
    elif qtype == "place":
        w = pick(PLACES, v)
        q["text"], q["keywords"] = f"{e} in {w}", [e, w]
    elif qtype == "product":
        model = pick(MODELS, v[1])
        q["text"], q["keywords"] = f"{v[0]} {model} {e}", [f"{v[0]} {model}", e]
    elif qtype == "author":
        first, last = note["author"].split()
        name = f"{first} {pick(LAST_NAMES, last)}"
        q["text"], q["keywords"] = f"{name} {e}", [name, e]
    q["need"] = "precise" if qtype in ("question", "product", "numeric") else "broad"
    return q


def _teacher(rng: random.Random, gold: dict, title_names_query: bool, teacher: dict) -> dict:
    """The imperfect teacher's step values for one record (see TEACHER): coverage, initial, case, calibrated."""
    mode = teacher["errors"]
    hard5 = title_names_query and gold["coverage"] in ("partial", "mention")
    hard6 = gold["case"] is not None and gold["case"] != CASES[gold["rule"]][0]
    u5, u6 = rng.random(), rng.random()
    if mode == "correlated":  # the teacher errs only where both blind spots meet, at both steps, on one draw
        hard5 = hard6 = hard5 and hard6
        u6 = u5
    err5 = mode != "none" and hard5 and u5 < teacher["initial_error"]
    err6 = mode != "none" and hard6 and u6 < teacher["calibration_error"]
    coverage = LEVELS[LEVELS.index(gold["coverage"]) + 1] if err5 else gold["coverage"]
    initial = _rubric(coverage, gold["query_category"] == gold["note_category"], gold["hits"])
    case = CASES[gold["rule"]][0] if err6 else gold["case"]
    calibrated = _calibrate(gold["rule"], case, initial) if gold["rule"] else initial
    return {
        "coverage": coverage,
        "initial": initial,
        "case": case,
        "calibrated": calibrated,
        "hard5": hard5,
        "hard6": hard6,
        "err5": err5,
        "err6": err6,
    }


def make_record(
    rng: random.Random, split: str, index: int, dist: str, case_prob: float | None = None, teacher: dict | None = None
) -> Record:
    """One record of the world, with gold values for every step; sft records carry the teacher's trace.

    The note is drawn first and alone (so nothing on its surface depends on the label), then the query's role in it
    (which sets the coverage), its type and the business-rule case; the note's detail line is the rule's evidence.
    `case_prob` overrides the distribution's chance of a non-default case."""
    teacher = dict(TEACHER if teacher is None else teacher)
    spec = DISTRIBUTIONS[dist]
    qtype = _weighted(rng, spec["types"])
    target = _weighted(rng, LABEL_TARGET)
    # rejection: P(label | query type) is LABEL_TARGET for every type. A label that a setting makes (nearly)
    # impossible for a type (e.g. -1 for qualifier queries when --case-prob 0 keeps every qualifier, a keyword hit)
    # gives up after 1000 draws and keeps the last record: the label mix then departs from the target for that type.
    for _ in range(1000):
        record = _draw_record(rng, split, index, spec, qtype, case_prob, teacher)
        if record.label == target:
            break
    return record


def _draw_record(rng, split, index, spec, qtype, case_prob, teacher) -> Record:
    note = _make_note(rng)
    # the detail line's kind follows the query's rule (a random kind for plain and author queries); its value is
    # drawn before the query and never from it
    kind = qtype if qtype in DETAIL_KINDS else rng.choice(DETAIL_KINDS)
    v = _detail_value(rng, kind, note)
    role = _weighted(rng, ROLES)
    case = None
    if qtype in CASES:
        default, *others = CASES[qtype]
        p = spec["case_prob"] if case_prob is None else case_prob
        case = rng.choice(others) if rng.random() < p else default
    q = _make_query(rng, qtype, note, role, case, v if qtype in DETAIL_KINDS else None)
    nondefault = case is not None and case != CASES[qtype][0]
    # the title names one of the note's entities (or none), drawn without looking at the query; in the correlated
    # control world the title bias is tied to the rule case instead, so the teacher's two blind spots coincide
    title_entity = rng.choice([note["entities"]["A"], note["entities"]["B"], note["entities"]["C"], None])
    if teacher["errors"] == "correlated" and role in ("B", "C"):
        others = [x for x in [*note["counts"], None] if x != q["entity"]]
        title_entity = q["entity"] if nondefault else rng.choice(others)
    title = rng.choice(TITLES).format(s=title_entity) if title_entity else f"My {note['category']} notes"
    title = title[0].upper() + title[1:]
    detail, author = _detail_text(kind, v), note["author"]
    content = " ".join(note["sentences"] + [detail])
    note_json = {"title": title, "content": content, "tags": [note["category"]]}
    text = f"{title} {content}"
    hits = [k for k in q["keywords"] if _contains(text, k) or k == author]
    misses = [k for k in q["keywords"] if k not in hits]
    coverage = coverage_level(note["counts"].get(q["entity"], 0))
    initial = _rubric(coverage, note["category"] == q["category"], hits)
    calibrated = _calibrate(qtype, case, initial) if case else initial
    gold = {
        "query_type": qtype,
        "need": q["need"],
        "subject": q["entity"],
        "coverage": coverage,
        "query_category": q["category"],
        "note_category": note["category"],
        "hits": hits,
        "misses": misses,
        "initial": initial,
        "rule": qtype if case else None,
        "case": case,
        "calibrated": calibrated,
        "final": calibrated,
        "title_names_query": title_entity == q["entity"],  # where the teacher's step-5 blind spot can act
    }
    t = _teacher(rng, gold, title_entity == q["entity"], teacher)
    record = Record(
        id=f"{split}-{index:06d}",
        query=q["text"],
        note=note_json,
        label=calibrated,
        query_extra={"category": q["category"], "subject": q["entity"]},  # query understanding: what it is about
        note_extra={"author": author},
        gold=gold,
    )
    if split == "sft":
        record.gold["teacher"] = {k: t[k] for k in ("coverage", "initial", "case", "calibrated")}
        record.reasoning = render_criteria_trace(
            need=q["need"],
            subject=q["entity"],
            coverage=t["coverage"],
            category=q["category"],
            match=note["category"] == q["category"],
            hits=len(hits),
            keywords=len(q["keywords"]),
            initial=t["initial"],
            rule=gold["rule"],
            case=t["case"],
            calibrated=t["calibrated"],
            final=t["calibrated"],
        )
    return record


def generate(
    seed: int = 0, sizes: dict | None = None, case_prob: float | None = None, teacher: dict | None = None
) -> dict[str, list[Record]]:
    """All splits; each split's stream depends only on (seed, split name, case_prob, teacher).

    `case_prob` is the difficulty knob of the RANDOM splits (sft, rl, val, test_random): the chance that a query
    type's business rule meets a non-default case. The default (None) keeps the distribution's own (0.3); the
    LONGTAIL split keeps 0.7 whatever the knob. `teacher` overrides TEACHER (the warm-up traces' error rates and
    mode); it changes the sft traces, and in the correlated mode the titles of every split.
    """
    if case_prob is not None and not 0 <= case_prob <= 1:
        raise ValueError(f"case_prob must be in [0, 1], got {case_prob}")
    teacher = check_teacher(teacher)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    out = {}
    for split, n in sizes.items():
        rng = random.Random(f"grm-sam/v{DRAWS}/{seed}/{split}")
        knob = case_prob if SPLITS[split] == "random" else None
        out[split] = [make_record(rng, split, i, SPLITS[split], knob, teacher) for i in range(n)]
    return out


def fingerprint() -> str:
    """A short hash of the code that decides the benchmark's bytes (this file and the trace format): a folder
    written by other code is regenerated by runtime.data.ensure_builtin even when the version number is the same."""
    import hashlib

    import sam.prompt

    h = hashlib.sha256()
    for path in (__file__, sam.prompt.__file__):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:12]


def check_teacher(teacher: dict | None) -> dict:
    out = dict(TEACHER)
    out.update(teacher or {})
    if set(out) != set(TEACHER):
        raise ValueError(f"teacher settings are {sorted(TEACHER)}, got {sorted(out)}")
    for key in ("initial_error", "calibration_error"):
        if not 0 <= out[key] <= 1:
            raise ValueError(f"teacher {key} must be in [0, 1], got {out[key]}")
    if out["errors"] not in TEACHER_MODES:
        raise ValueError(f"teacher errors must be one of {TEACHER_MODES}, got {out['errors']!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics and files


_WORD = re.compile(r"[a-z]+|[0-9]+")


def _note_text(r: Record) -> str:
    return " ".join([r.note["title"], r.note["content"], *r.note["tags"], *map(str, r.note_extra.values())])


def _query_text(r: Record) -> str:
    return " ".join([r.query, *map(str, r.query_extra.values())])


def bow_baseline(train: list[Record], tests: dict[str, list[Record]], view, dims: int = 1024) -> dict[str, float]:
    """Accuracy of a bag-of-words multinomial logistic regression that reads only `view(record)`: unigram and
    bigram counts hashed (crc32) into `dims` buckets, log1p-scaled, fit on `train` by 200 full-batch Adam steps
    (zero init: deterministic), its L2 strength chosen among 1e-3, 1e-2 and 1e-1 on the `val` split of `tests`
    (on `train` without one), and scored on each split of `tests`. The note-only and query-only views must stay
    near the majority label: a model that beats them by much has found a one-sided shortcut, not relevance."""

    bucket: dict[str, int] = {}

    def features(records) -> np.ndarray:
        rows, cols = [], []
        for i, r in enumerate(records):
            words = _WORD.findall(view(r).lower())
            grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
            cols += [bucket[g] if g in bucket else bucket.setdefault(g, zlib.crc32(g.encode()) % dims) for g in grams]
            rows += [i] * len(grams)
        x = np.zeros((len(records), dims + 1), dtype=np.float32)
        np.add.at(x, (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)), 1.0)
        x[:, -1] = 1.0  # bias
        return np.log1p(x)

    def fit(x, onehot, l2s):
        """One fit per L2 strength, all at once: the weights side by side, so each step reads `x` twice in all
        (not twice per strength). The columns never mix: each block is its own softmax regression."""
        k, n = len(LABELS), len(l2s)
        w = np.zeros((dims + 1, n * k), dtype=np.float32)
        l2 = np.repeat(np.asarray(l2s, dtype=np.float32), k)
        target = np.tile(onehot, (1, n))
        m, v = np.zeros_like(w), np.zeros_like(w)
        for t in range(1, 201):  # Adam on the mean cross-entropy
            z = (x @ w).reshape(len(x), n, k)
            p = np.exp(z - z.max(2, keepdims=True))
            p /= p.sum(2, keepdims=True)
            grad = x.T @ (p.reshape(len(x), n * k) - target) / len(x) + l2 * w
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            w = w - 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        return [w[:, i * k : (i + 1) * k] for i in range(n)]

    def accuracy(w, x, records):
        return float(np.mean((x @ w).argmax(1) == np.array([LABELS.index(r.label) for r in records])))

    x = features(train)
    onehot = np.eye(len(LABELS), dtype=np.float32)[[LABELS.index(r.label) for r in train]]
    select = tests.get("val") or train
    x_select = features(select)
    fits = fit(x, onehot, (1e-3, 1e-2, 1e-1))
    w = max(fits, key=lambda w: accuracy(w, x_select, select))  # the first of equals: deterministic
    return {name: round(accuracy(w, features(records), records), 4) for name, records in tests.items()}


def _detail_line(r: Record) -> str:
    return r.note["content"].rsplit(". ", 1)[-1]


def split_stats(records: list[Record], train_majority: int, type_majority: dict) -> dict:
    n = max(1, len(records))
    labels = Counter(r.label for r in records)
    types = Counter(r.gold["query_type"] for r in records)
    g = [r.gold for r in records]
    # the joint distribution SAM's case needs, on the same records: is step 5 hard (a partial or mention note whose
    # title names the query's subject: the teacher's title bias) and does step 6 change the score
    joint = Counter(
        f"step 5 {'hard' if x.get('title_names_query') and x['coverage'] in ('partial', 'mention') else 'plain'}, "
        f"calibration {'changes' if x['calibrated'] != x['initial'] else 'keeps'} the score"
        for x in g
    )
    out = {
        "size": len(records),
        "labels": {str(k): labels.get(k, 0) for k in LABELS},
        "query_types": {t: types.get(t, 0) for t in QUERY_TYPES},
        "coverage": {c: sum(x["coverage"] == c for x in g) for c in reversed(LEVELS)},
        "rule_applies_frac": round(sum(x["rule"] is not None for x in g) / n, 4),
        "nondefault_case_frac": round(sum(x["case"] not in (None, CASES.get(x["rule"], ("",))[0]) for x in g) / n, 4),
        "calibration_changes_frac": round(sum(x["calibrated"] != x["initial"] for x in g) / n, 4),
        "joint": dict(sorted(joint.items())),
        "baseline_acc": {
            "majority_label": round(sum(r.label == train_majority for r in records) / n, 4),
            "query_type_majority": round(
                sum(r.label == type_majority.get(x["query_type"]) for r, x in zip(records, g)) / n, 4
            ),
            "initial_score_no_calibration": round(sum(r.label == x["initial"] for r, x in zip(records, g)) / n, 4),
        },
    }
    teacher = [x["teacher"] for x in g if "teacher" in x]
    if teacher:
        out["teacher"] = {
            "label_acc": round(sum(t["calibrated"] == r.label for t, r in zip(teacher, records)) / n, 4),
            "initial_error_rate": round(sum(t["initial"] != x["initial"] for t, x in zip(teacher, g)) / n, 4),
            "calibration_error_rate": round(sum(t["case"] != x["case"] for t, x in zip(teacher, g)) / n, 4),
            "both_steps_wrong_rate": round(
                sum(t["initial"] != x["initial"] and t["case"] != x["case"] for t, x in zip(teacher, g)) / n, 4
            ),
        }
    return out


def compute_stats(
    splits: dict[str, list[Record]],
    seed: int,
    case_prob: float | None = None,
    teacher: dict | None = None,
    *,
    baselines: tuple[str, ...] | None = None,
) -> dict:
    """Distributions, the teacher's error rates and trivial baselines; the majority labels and the bag-of-words
    baselines are fit on the rl split (the training data) and scored on every split. `baselines` names the
    bag-of-words views to fit (default: all four; each takes seconds on the full benchmark)."""
    train = splits.get("rl") or next(iter(splits.values()))
    majority = Counter(r.label for r in train).most_common(1)[0][0] if train else 0
    by_type: dict[str, Counter] = {}
    for r in train:
        by_type.setdefault(r.gold["query_type"], Counter())[r.label] += 1
    type_majority = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    stats = {
        "version": VERSION,
        "generator": fingerprint(),
        "seed": seed,
        "case_prob": {
            "random": DISTRIBUTIONS["random"]["case_prob"] if case_prob is None else case_prob,
            "longtail": DISTRIBUTIONS["longtail"]["case_prob"],
        },
        "teacher": check_teacher(teacher),
        "train_majority_label": majority,
        "splits": {name: split_stats(recs, majority, type_majority) for name, recs in splits.items()},
    }
    views = {
        "note_only_bow": _note_text,
        "query_only_bow": _query_text,
        "detail_line_only_bow": _detail_line,
        "query_and_note_bow": lambda r: _query_text(r) + " " + _note_text(r),
    }
    unknown = set(baselines or ()) - set(views)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {list(views)}")
    if train:
        for key, view in views.items():
            if baselines is not None and key not in baselines:
                continue
            for name, acc in bow_baseline(train, splits, view).items():
                stats["splits"][name]["baseline_acc"][key] = acc
    return stats


def tokenizer_corpus(splits: dict[str, list[Record]]):
    """Every text the benchmark and the formats emit (the tokenizer's vocabulary must cover all of it)."""
    for fmt in FORMATS:
        yield instruction(fmt)
    for records in splits.values():
        for r in records:
            yield render_prompt(r, "criteria")
            for fmt in FORMATS:
                yield render_gold_reasoning(r, fmt)


def vocabulary_corpus():
    """Texts whose pieces make the tokenizer's vocabulary: the world's lexicon and templates, and every text of a
    canonical sample (seed 0, default sizes). It does not depend on the seed or sizes being written, so one
    tokenizer serves every generated benchmark."""
    for entities, qualifiers in CATEGORIES.values():
        yield " ".join(entities + qualifiers)
    yield " ".join(PLACES + FIRST_NAMES + LAST_NAMES + BRANDS + MODELS + list(CATEGORIES) + list(QUERY_TYPES))
    yield " ".join(TOPIC_TEMPLATES + FILLER)
    yield from tokenizer_corpus(generate(0))


@functools.lru_cache(maxsize=1)
def _world_tokenizer():
    """The benchmark's tokenizer, built once per process: its corpus depends on this code alone, and building it
    generates the canonical sample (about 8 s), which every benchmark a process writes would otherwise repeat. One
    shared object: write_benchmark only saves it; load the saved folder to use it."""
    return build_tokenizer(vocabulary_corpus())


def write_benchmark(
    out: str | Path,
    seed: int = 0,
    sizes: dict | None = None,
    case_prob: float | None = None,
    teacher: dict | None = None,
) -> dict:
    """Generate and write `out`/{split}.jsonl, stats.json and tokenizer/; returns the stats."""
    out = Path(out)
    splits = generate(seed, sizes, case_prob, teacher)
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", records)
    stats = compute_stats(splits, seed, case_prob, teacher)
    save_tokenizer(_world_tokenizer(), out / "tokenizer")
    # stats.json last: its version is what runtime.data.ensure_builtin trusts as "this folder is complete"
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def parse_sizes(text: str) -> dict:
    sizes = dict(DEFAULT_SIZES)
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in SPLITS:
            raise argparse.ArgumentTypeError(f"unknown split {name!r} in --sizes; splits are {list(SPLITS)}")
        if not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--sizes {name}: expected a non-negative integer, got {value!r}")
        sizes[name] = int(value)
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=f"Write the built-in grounded-relevance benchmark (version {VERSION}).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=parse_sizes, default=dict(DEFAULT_SIZES), help="e.g. sft=2000,rl=8000,val=1000")
    p.add_argument(
        "--case-prob",
        type=float,
        default=None,
        help="difficulty: chance of a non-default business-rule "
        f"case in the random splits (default {DISTRIBUTIONS['random']['case_prob']}; test_longtail keeps "
        f"{DISTRIBUTIONS['longtail']['case_prob']})",
    )
    p.add_argument(
        "--teacher-initial-error",
        type=float,
        default=TEACHER["initial_error"],
        help="rate at which the warm-up traces' teacher falls for the title bias at step 5 (on the "
        "records where it can)",
    )
    p.add_argument(
        "--teacher-calibration-error",
        type=float,
        default=TEACHER["calibration_error"],
        help="rate at which the teacher misses a non-default business-rule case at step 6",
    )
    p.add_argument(
        "--teacher-errors",
        choices=TEACHER_MODES,
        default=TEACHER["errors"],
        help="independent (the two blind spots on their own records), correlated (the control world: "
        "they coincide, one draw decides both), none (a perfect teacher)",
    )
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    for flag in ("case_prob", "teacher_initial_error", "teacher_calibration_error"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 1:  # also refuses nan
            p.error(f"--{flag.replace('_', '-')} must be in [0, 1], got {value}")
    teacher = {
        "initial_error": args.teacher_initial_error,
        "calibration_error": args.teacher_calibration_error,
        "errors": args.teacher_errors,
    }
    try:
        stats = write_benchmark(args.out, args.seed, args.sizes, args.case_prob, teacher)
    except OSError as exc:
        print(f"error: cannot write the benchmark to {args.out}: {exc}", file=sys.stderr)
        return 1
    for name, s in stats["splits"].items():
        b = s["baseline_acc"]
        line = (
            f"{name:>14}: {s['size']:>6} records, labels {s['labels']}, calibration changes "
            f"{s['calibration_changes_frac']:.1%}; acc of majority {b['majority_label']:.1%}, note-only "
            f"{b.get('note_only_bow', float('nan')):.1%}, query-only {b.get('query_only_bow', float('nan')):.1%}"
        )
        if "teacher" in s:
            line += f"; teacher label acc {s['teacher']['label_acc']:.1%}"
        print(line)
    print(f"wrote {args.out}/{{{','.join(stats['splits'])}}}.jsonl, stats.json, tokenizer/ (version {VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
