"""The built-in grounded-relevance benchmark: a seeded generator of queries, notes and gold reasoning.

    python -m data.synthetic --out data/builtin                   # default sizes, seed 0; a few seconds
    python -m data.synthetic --out DIR --seed 1 --sizes sft=500,rl=2000

It mirrors the paper's setting (PAPER.md) in a closed world: categories with entities and qualifiers, places,
brands and models, authors and prices. A query has one of nine types (plain, qualifier, comparison, ranking,
question, numeric, place, product, author). A note covers the query to a controlled degree - the share of its
sentences about the query subject is large (9-10 of 10), partial (3-7 of 10), mention (1 of 12) or none - and
carries keyword hits, near misses (a sibling entity of the same category) and the evidence a business rule needs
(the qualifier kept, dropped or contradicted; one or both sides of a comparison; a list of 1, 2 or 3+ items; a
direct answer or none; a price or none; the right or another place; product details or a passing use; the exact
or a partial author name). The rubric (sam/prompt.py RUBRIC) gives the initial score from the coverage, the
category match and the keyword hits measured on the generated text; the business rule of the query type then
calibrates it (sam/prompt.py BUSINESS_RULES); the final label is the calibrated score. The label therefore
depends on reading the note: none of coverage, hits or rule evidence is visible from the query.

Splits (deterministic per seed and split name, independent of the other splits' sizes): sft (with gold reasoning
traces), rl (label-only), val and test_random (natural distribution: plain queries dominate, business rules rarely
change the score), test_longtail (rare query types dominate and rules change the score often). Every record carries
gold values for every step. Also written: stats.json (distributions, calibration rates, trivial baselines) and
tokenizer/ (a word-level Hugging Face tokenizer over the benchmark's closed vocabulary).
"""

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from data.schema import Record, write_jsonl, write_text_atomic
from data.tokenizer import build_tokenizer, save_tokenizer
from sam.prompt import FORMATS, instruction, render_gold_reasoning, render_prompt

# ---------------------------------------------------------------------------------------------------------------
# The world

CATEGORIES = {
    "food": (["ramen", "hotpot", "dumplings", "bubble tea", "croissant", "sushi", "tacos", "curry", "cheesecake"],
             ["vegan", "spicy", "homemade", "gluten free", "late night"]),
    "travel": (["hiking trail", "beach resort", "night market", "ski trip", "road trip", "hot spring", "island tour"],
               ["budget", "family", "solo", "weekend", "luxury"]),
    "beauty": (["sunscreen", "lipstick", "face mask", "hair dye", "eyeliner", "moisturizer", "perfume"],
               ["waterproof", "natural", "long lasting", "sensitive skin", "travel size"]),
    "fitness": (["yoga", "running shoes", "home workout", "swimming", "pilates", "weight training", "cycling"],
                ["beginner", "low impact", "morning", "quick", "advanced"]),
    "tech": (["laptop", "phone case", "earbuds", "smart watch", "camera", "keyboard", "tablet"],
             ["wireless", "gaming", "lightweight", "refurbished", "foldable"]),
    "parenting": (["baby stroller", "toddler snacks", "bedtime story", "school bag", "baby bottle", "potty training"],
                  ["organic", "safe", "portable", "twin", "newborn"]),
    "home": (["sofa", "desk lamp", "rice cooker", "storage box", "curtains", "plant pot", "air purifier"],
             ["small", "quiet", "wooden", "modern", "second hand"]),
    "fashion": (["denim jacket", "sneakers", "wool coat", "summer dress", "handbag", "scarf", "boots"],
                ["oversized", "vintage", "black", "linen", "plus size"]),
}  # fmt: skip
PLACES = ["Chengdu", "Kyoto", "Lisbon", "Seoul", "Bangkok", "Paris", "Hangzhou", "Osaka", "Bali", "Xiamen"]
FIRST_NAMES = ["Mia", "Leo", "Ava", "Max", "Ivy", "Sam", "Zoe", "Ken"]
LAST_NAMES = ["Chen", "Wang", "Liu", "Zhang", "Zhou", "Lin", "Xu", "Guo"]
BRANDS = ["Lumi", "Orca", "Nova", "Kiko", "Terra", "Vela"]
MODELS = ["Pro", "Mini", "Air", "Max", "Lite"]
PRICES = [20, 30, 50, 80, 100, 200]
RANK_SIZES = [3, 5, 10]

QUERY_TYPES = ("plain", "qualifier", "comparison", "ranking", "question", "numeric", "place", "product", "author")
RARE_TYPES = ("comparison", "ranking", "numeric", "author")
# outcome names of each business rule; the first is the default (the rule keeps the score)
CASES = {
    "qualifier": ("kept", "dropped", "flipped"),
    "comparison": ("both", "one side"),
    "ranking": ("three or more", "two", "one"),
    "question": ("answered", "not answered"),
    "numeric": ("present", "absent"),
    "place": ("guide", "other place"),
    "product": ("details", "related use"),
    "author": ("exact", "partial"),
}
DISTRIBUTIONS = {
    "random": {
        "types": dict(plain=40, qualifier=15, comparison=3, ranking=3, question=12, numeric=3, place=12, product=9,
                      author=3),
        "case_prob": 0.12,  # chance that a rule's evidence is a non-default case
    },
    "longtail": {
        "types": dict(plain=4, qualifier=8, comparison=16, ranking=16, question=8, numeric=16, place=8, product=8,
                      author=16),
        "case_prob": 0.7,
    },
}  # fmt: skip
COVERAGE = {"large": 35, "partial": 25, "mention": 15, "none": 25}
SPLITS = {"sft": "random", "rl": "random", "val": "random", "test_random": "random", "test_longtail": "longtail"}
DEFAULT_SIZES = {"sft": 2000, "rl": 8000, "val": 500, "test_random": 1000, "test_longtail": 1000}

TOPIC_TEMPLATES = [
    "I tried {s} last week and loved it.",
    "Here is what I learned about {s}.",
    "Many friends asked me about {s}.",
    "The best part of {s} is the detail.",
    "I would pick {s} again.",
    "Tip: plan ahead for {s}.",
    "My honest notes on {s} are below.",
    "People often get {s} wrong.",
    "I spent a whole month on {s}.",
    "Saving this post about {s} for later.",
]
FILLER = [
    "The weather was nice that day.",
    "Thanks for reading and see you soon.",
    "Follow me for more posts.",
    "Leave a comment if you have questions.",
    "My cat slept the whole afternoon.",
    "Coffee first, then everything else.",
]


def _weighted(rng: random.Random, weights: dict):
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _contains(text: str, phrase: str) -> bool:
    return re.search(r"(?<![A-Za-z])" + re.escape(phrase.lower()) + r"(?![A-Za-z])", text.lower()) is not None


# ---------------------------------------------------------------------------------------------------------------
# Queries


def _make_query(rng: random.Random, qtype: str) -> dict:
    """The query text, its keywords and the slots the note and the rule need."""
    cat = rng.choice(sorted(CATEGORIES))
    entities, qualifiers = CATEGORIES[cat]
    e = rng.choice(entities)
    q = dict(type=qtype, category=cat, entity=e, keywords=[e])
    if qtype == "plain":
        q["text"] = e if rng.random() < 0.5 else f"{e} tips"
    elif qtype == "qualifier":
        q["qualifier"] = rng.choice(qualifiers)
        q["text"] = f"{q['qualifier']} {e}"
        q["keywords"] = [q["qualifier"], e]
    elif qtype == "comparison":
        q["other"] = rng.choice([x for x in entities if x != e])
        q["text"] = f"{e} vs {q['other']}"
        q["keywords"] = [e, q["other"]]
    elif qtype == "ranking":
        q["size"] = rng.choice(RANK_SIZES)
        q["text"] = f"top {q['size']} {e}"
    elif qtype == "question":
        q["text"] = f"how to choose {e}"
    elif qtype == "numeric":
        q["price"] = rng.choice(PRICES)
        q["text"] = f"{e} under {q['price']} dollars"
        q["keywords"] = [e, str(q["price"])]
    elif qtype == "place":
        q["place"] = rng.choice(PLACES)
        q["text"] = f"{e} in {q['place']}"
        q["keywords"] = [e, q["place"]]
    elif qtype == "product":
        q["product"] = f"{rng.choice(BRANDS)} {rng.choice(MODELS)} {e}"
        q["text"] = q["product"]
        q["keywords"] = [q["product"]]
    elif qtype == "author":
        q["author"] = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        q["text"] = f"{q['author']} {e}"
        q["keywords"] = [q["author"], e]
    q["need"] = "precise" if qtype in ("question", "product", "numeric") else "broad"
    return q


# ---------------------------------------------------------------------------------------------------------------
# Notes


def _evidence(rng: random.Random, q: dict, case: str) -> tuple[str, list[str], str, str]:
    """(subject phrase of on-topic sentences, evidence sentences, rule text for the trace, author)."""
    e, t = q["entity"], q["type"]
    author = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    if t == "qualifier":
        qual = q["qualifier"]
        if case == "kept":
            return (
                f"{qual} {e}",
                [f"Everything here is about {qual} {e}."],
                f"the note keeps the qualifier {qual}",
                author,
            )
        if case == "dropped":
            return e, [f"This is about {e} in general."], f"the note drops the qualifier {qual}", author
        return e, [f"To be clear, this {e} is not {qual}."], f"the note contradicts the qualifier {qual}", author
    if t == "comparison":
        if case == "both":
            return (
                e,
                [f"I put {e} and {q['other']} side by side."],
                f"the note covers both {e} and {q['other']}",
                author,
            )
        return e, [f"I only had time for {e}."], f"the note covers only {e}", author
    if t == "ranking":
        k = {"three or more": rng.randint(3, q["size"]), "two": 2, "one": 1}[case]
        items = " ".join(f"{i + 1}. {p} {e}." for i, p in enumerate(rng.sample(PLACES, k)))
        return e, [f"My list: {items}"], f"the note lists {k} item{'s' if k > 1 else ''}", author
    if t == "question":
        if case == "answered":
            return e, [f"The answer: to choose {e}, check the size, the price and the reviews."], (
                "the note answers the question directly"), author  # fmt: skip
        return e, [f"I still do not know how to choose {e}."], "the note does not answer the question", author
    if t == "numeric":
        if case == "present":
            price = rng.choice([p for p in PRICES if p < q["price"]] or [q["price"] // 2])
            return e, [f"It costs {price} dollars."], f"the note gives a price of {price} dollars", author
        return e, [f"I forgot to note the price of {e}."], "the note gives no price", author
    if t == "place":
        if case == "guide":
            p = q["place"]
            return f"{e} in {p}", [f"A full guide to {e} in {p}."], f"the note is a guide for {p}", author
        p = rng.choice([x for x in PLACES if x != q["place"]])
        return f"{e} in {p}", [f"A full guide to {e} in {p}."], f"the note is about {p}, not {q['place']}", author
    if t == "product":
        prod = q["product"]
        if case == "details":
            return prod, [f"The {prod} has a solid build and a long battery life."], (
                f"the note gives details of the {prod}"), author  # fmt: skip
        return prod, [f"I took my {prod} on a trip to {rng.choice(PLACES)}."], (
            f"the note only mentions using the {prod}"), author  # fmt: skip
    if t == "author":
        first, last = q["author"].split()
        if case == "exact":
            return e, [], f"the note is by {q['author']}", q["author"]
        other = f"{first} {rng.choice([x for x in LAST_NAMES if x != last])}"
        return e, [], f"the note is by {other}, a partial match", other
    return e, [], "", author


def _calibrate(qtype: str, case: str, initial: int) -> int:
    """The business rule of `qtype` applied to the initial score (only called when initial >= 1)."""
    default = CASES[qtype][0]
    if case == default:
        return initial
    drop_one = max(1, initial - 1)
    return {
        ("qualifier", "dropped"): drop_one,
        ("qualifier", "flipped"): 0,
        ("comparison", "one side"): drop_one,
        ("ranking", "two"): drop_one,
        ("ranking", "one"): 1,
        ("question", "not answered"): min(initial, 1),
        ("numeric", "absent"): drop_one,
        ("place", "other place"): 0,
        ("product", "related use"): 1,
        ("author", "partial"): 1,
    }[(qtype, case)]


def _rubric(coverage: str, category_match: bool, hits: list[str]) -> int:
    if coverage == "large":
        return 3
    if coverage == "partial":
        return 2
    if coverage == "mention":
        return 1
    return 0 if category_match or hits else -1


def _sentences(rng, subject: str, n: int) -> list[str]:
    return [rng.choice(TOPIC_TEMPLATES).format(s=subject) for _ in range(n)]


def make_record(rng: random.Random, split: str, index: int, dist: str, case_prob: float | None = None) -> Record:
    """One record of the world, with gold values for every step. `case_prob` overrides the distribution's."""
    spec = DISTRIBUTIONS[dist]
    q = _make_query(rng, _weighted(rng, spec["types"]))
    qtype, e, cat = q["type"], q["entity"], q["category"]
    coverage = _weighted(rng, COVERAGE)
    case = None
    if qtype in CASES:
        default, *others = CASES[qtype]
        case = rng.choice(others) if rng.random() < (spec["case_prob"] if case_prob is None else case_prob) else default

    if coverage == "none":
        kind = rng.choice(["near miss", "keyword", "unrelated"])
        note_cat = cat if kind == "near miss" else rng.choice([c for c in sorted(CATEGORIES) if c != cat])
        pool = [x for x in CATEGORIES[note_cat][0] if x not in q["keywords"] and x != q.get("other")]
        other = rng.choice(pool)
        body = _sentences(rng, other, 7) + rng.sample(FILLER, 3)
        author = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        side = {"qualifier": q.get("qualifier"), "numeric": str(q.get("price")), "place": q.get("place")}.get(qtype)
        if kind == "keyword" and side:
            # a side keyword of the query (never its subject) appears in passing in an unrelated note: tangential
            body[1] = f"I also saw a sign that said {side}."
        elif kind == "keyword" and qtype == "author":
            author = q["author"]  # an unrelated note by the queried author
        title = f"My {other} story"
        rule_text, evidence = "", []
    else:
        note_cat = cat
        subject, evidence, rule_text, author = _evidence(rng, q, case) if case else (e, [], "", None)
        author = author or f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if coverage == "large":
            n_topic, n_total = rng.randint(9, 10), 10
        elif coverage == "partial":
            n_topic, n_total = rng.randint(3, 7), 10
        else:
            n_topic, n_total = 1, 12
        topic = (evidence + _sentences(rng, subject, n_topic))[:n_topic]
        others = [x for x in CATEGORIES[cat][0] if x != e and x != q.get("other")]
        off = []
        for _ in range(n_total - n_topic):
            off.append(rng.choice(FILLER) if rng.random() < 0.5 else _sentences(rng, rng.choice(others), 1)[0])
        # on-topic sentences first for a large share, spread otherwise
        body = topic + off if coverage == "large" else off[:1] + topic + off[1:]
        title = f"All about {subject}" if coverage == "large" else f"My {cat} diary"

    content = " ".join(body)
    note = {"title": title, "content": content, "tags": [note_cat]}
    text = f"{title} {content}"
    hits = [k for k in q["keywords"] if _contains(text, k) or (k == q.get("author") and k == author)]
    misses = [k for k in q["keywords"] if k not in hits]
    initial = _rubric(coverage, note_cat == cat, hits)
    applies = case is not None and initial >= 1
    calibrated = _calibrate(qtype, case, initial) if applies else initial
    gold = {
        "query_type": qtype,
        "need": q["need"],
        "coverage": coverage,
        "query_category": cat,
        "note_category": note_cat,
        "hits": hits,
        "misses": misses,
        "initial": initial,
        "rule": qtype if applies else None,
        "case": case if applies else None,
        "rule_text": rule_text if applies else "",
        "calibrated": calibrated,
        "final": calibrated,
    }
    record = Record(
        id=f"{split}-{index:06d}",
        query=q["text"],
        note=note,
        label=calibrated,
        query_extra={"category": cat},
        note_extra={"author": author},
        gold=gold,
    )
    if split == "sft":
        record.reasoning = render_gold_reasoning(record, "criteria")
    return record


def generate(seed: int = 0, sizes: dict | None = None, case_prob: float | None = None) -> dict[str, list[Record]]:
    """All splits; each split's stream depends only on (seed, split name, case_prob).

    `case_prob` is the difficulty knob of the RANDOM splits (sft, rl, val, test_random): the chance that a query
    type's business rule meets a non-default case, so that calibration (step 6) changes the initial score. The
    default (None) keeps the distribution's own 0.12, under which calibration changes about 5% of the labels; the
    LONGTAIL split keeps 0.7 whatever the knob. Raise it when a study needs the intermediate scores to disagree
    with the final one more often (SAM only acts on such rollouts; docs/ablation.md).
    """
    if case_prob is not None and not 0 <= case_prob <= 1:
        raise ValueError(f"case_prob must be in [0, 1], got {case_prob}")
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    out = {}
    for split, n in sizes.items():
        rng = random.Random(f"grm-sam/{seed}/{split}")
        knob = case_prob if SPLITS[split] == "random" else None
        out[split] = [make_record(rng, split, i, SPLITS[split], knob) for i in range(n)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics and files


def split_stats(records: list[Record], train_majority: int, type_majority: dict) -> dict:
    n = max(1, len(records))
    labels = Counter(r.label for r in records)
    types = Counter(r.gold["query_type"] for r in records)
    return {
        "size": len(records),
        "labels": {str(k): labels.get(k, 0) for k in (-1, 0, 1, 2, 3)},
        "query_types": {t: types.get(t, 0) for t in QUERY_TYPES},
        "coverage": dict(Counter(r.gold["coverage"] for r in records)),
        "rule_applies_frac": sum(r.gold["rule"] is not None for r in records) / n,
        "calibration_changes_frac": sum(r.gold["calibrated"] != r.gold["initial"] for r in records) / n,
        "baseline_acc": {
            "majority_label": sum(r.label == train_majority for r in records) / n,
            "query_type_majority": sum(r.label == type_majority.get(r.gold["query_type"]) for r in records) / n,
            "initial_score_no_calibration": sum(r.label == r.gold["initial"] for r in records) / n,
        },
    }


def compute_stats(splits: dict[str, list[Record]], seed: int, case_prob: float | None = None) -> dict:
    """Distributions and trivial baselines; the majority labels come from the rl split (the training data)."""
    train = splits.get("rl") or next(iter(splits.values()))
    majority = Counter(r.label for r in train).most_common(1)[0][0] if train else 0
    by_type: dict[str, Counter] = {}
    for r in train:
        by_type.setdefault(r.gold["query_type"], Counter())[r.label] += 1
    type_majority = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    return {
        "seed": seed,
        "case_prob": {
            "random": DISTRIBUTIONS["random"]["case_prob"] if case_prob is None else case_prob,
            "longtail": DISTRIBUTIONS["longtail"]["case_prob"],
        },  # fmt: skip
        "train_majority_label": majority,
        "splits": {name: split_stats(recs, majority, type_majority) for name, recs in splits.items()},
    }


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


def write_benchmark(out: str | Path, seed: int = 0, sizes: dict | None = None, case_prob: float | None = None) -> dict:
    """Generate and write `out`/{split}.jsonl, stats.json and tokenizer/; returns the stats."""
    out = Path(out)
    splits = generate(seed, sizes, case_prob)
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", records)
    stats = compute_stats(splits, seed, case_prob)
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    save_tokenizer(build_tokenizer(vocabulary_corpus()), out / "tokenizer")
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
    p = argparse.ArgumentParser(description="Write the built-in grounded-relevance benchmark.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=parse_sizes, default=dict(DEFAULT_SIZES), help="e.g. sft=2000,rl=8000,val=500")
    p.add_argument("--case-prob", type=float, default=None, help="difficulty: chance of a non-default business-rule "
                   "case in the random splits (default 0.12; test_longtail keeps 0.7)")  # fmt: skip
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    if args.case_prob is not None and not 0 <= args.case_prob <= 1:
        p.error(f"--case-prob must be in [0, 1], got {args.case_prob}")
    try:
        stats = write_benchmark(args.out, args.seed, args.sizes, args.case_prob)
    except OSError as exc:
        print(f"error: cannot write the benchmark to {args.out}: {exc}", file=sys.stderr)
        return 1
    for name, s in stats["splits"].items():
        b = s["baseline_acc"]
        print(
            f"{name:>14}: {s['size']:>6} records, labels {s['labels']}, calibration changes "
            f"{s['calibration_changes_frac']:.1%}, majority acc {b['majority_label']:.1%}, "
            f"initial-score acc {b['initial_score_no_calibration']:.1%}"
        )
    print(f"wrote {args.out}/{{{','.join(stats['splits'])}}}.jsonl, stats.json, tokenizer/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
