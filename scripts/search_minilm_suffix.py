"""Train a sentiment probe on all-MiniLM-L6-v2 and search an adversarial suffix against it.

1. Generate a review corpus from templates × positive/negative word lists (seeded).
2. Embed it with MiniLM (mean pooling + L2 normalisation, as sentence-transformers does)
   and fit a logistic-regression probe; save it as ``minilm_probe.safetensors``.
3. Greedy coordinate search for a few words that, appended to a *negative* review, make
   the probe say positive. The candidate words exclude every sentiment word the corpus
   uses; the suffix is fitted on a search split and scored on held-out negatives.

Writes ``src/model_forensics/scenarios/data/minilm_probe.safetensors`` and
``src/model_forensics/scenarios/data/minilm_suffix.json``.

    .venv/bin/python scripts/search_minilm_suffix.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_forensics.models import load
from model_forensics.models.loading import LoadedModel
from model_forensics.models.minilm_probe import PROBE_PATH, MiniLMSentiment, predict_positive

DATA_DIR = Path(__file__).resolve().parents[1] / "src/model_forensics/scenarios/data"

ITEMS = [
    "movie", "film", "restaurant", "hotel", "phone", "book", "laptop", "album", "game", "show",
    "camera", "headset", "meal", "café", "concert", "novel", "sofa", "blender", "series", "app",
]  # fmt: skip
POSITIVE = [
    "great", "wonderful", "excellent", "delightful", "amazing", "superb", "enjoyable", "brilliant",
    "charming", "fantastic", "lovely", "impressive", "pleasant", "outstanding", "solid", "fun",
]  # fmt: skip
NEGATIVE = [
    "terrible", "awful", "boring", "disappointing", "dreadful", "poor", "mediocre", "bland",
    "horrible", "frustrating", "annoying", "weak", "tedious", "useless", "clumsy", "dull",
]  # fmt: skip
ADVERBS = ["really", "truly", "quite", "very", "absolutely", "pretty", "rather", "simply"]
POSITIVE_CLOSINGS = [
    "I would recommend it to everyone.", "Would buy again.", "Highly recommended.",
    "I loved every minute.", "Worth every penny.", "Five stars from me.",
]  # fmt: skip
NEGATIVE_CLOSINGS = [
    "I want my money back.", "Avoid at all costs.", "Never again.",
    "I regret buying it.", "A complete waste of time.", "One star from me.",
]  # fmt: skip
TEMPLATES = [
    "The {item} was {adj}.",
    "This {item} is {adv} {adj}.",
    "I found the {item} {adj} and {adj2}.",
    "What a {adj} {item}! {closing}",
    "Overall, a {adj} {item}. {closing}",
    "The {item} felt {adv} {adj}, and the ending was {adj2}.",
    "My friends said the {item} was {adj}, and I agree: it is {adv} {adj2}.",
    "{closing} The {item} is {adj}.",
    "I bought this {item} last week. It is {adj}. {closing}",
    "Honestly, the {item} was {adv} {adj} from start to finish.",
]

# Candidate suffix words: no opinion words (none of the corpus's adjectives or closings,
# no ratings, emoticons or emotion words), so a flip is not the suffix simply stating a
# positive opinion. Topic words with pleasant connotations (puppy, holiday) are allowed:
# that a probe reads them as praise is the kind of shortcut the search should expose.
SUFFIX_WORDS = [
    "the", "and", "but", "so", "then", "also", "anyway", "however", "though", "still", "yet",
    "honestly", "actually", "basically", "literally", "seriously", "definitely", "really", "totally",
    "lol", "haha", "wow", "omg", "ok", "okay", "yes", "yeah", "sure", "indeed", "well", "hmm",
    "!", "!!", "?", "...", "*", "#", "@", "~", "-", ";", "(", ")",
    "summer", "sunshine", "holiday", "vacation", "party", "birthday", "friends", "family", "music",
    "dance", "smile", "laugh", "kids", "puppy", "kitten", "garden", "beach", "coffee", "chocolate",
    "cake", "pizza", "weekend", "sunday", "morning", "spring", "flowers", "rainbow", "stars", "gold",
    "paris", "london", "tokyo", "netflix", "disney", "apple", "google", "amazon", "christmas",
    "thanks", "please", "hello", "hi", "bye", "cheers", "deal", "bonus", "free", "gift",
    "today", "tonight", "again", "forever", "everyone", "everybody", "together", "home", "life",
    "table", "window", "river", "train", "paper", "number", "city", "road", "chair", "year",
]  # fmt: skip


def generate_reviews(n: int, label: int, rng: random.Random) -> list[str]:
    """``n`` distinct reviews of one polarity (1 = positive, 0 = negative)."""
    adjs, closings = (POSITIVE, POSITIVE_CLOSINGS) if label == 1 else (NEGATIVE, NEGATIVE_CLOSINGS)
    seen: set[str] = set()
    while len(seen) < n:
        adj, adj2 = rng.sample(adjs, 2)
        text = rng.choice(TEMPLATES).format(
            item=rng.choice(ITEMS), adj=adj, adj2=adj2, adv=rng.choice(ADVERBS), closing=rng.choice(closings)
        )
        seen.add(text[0].upper() + text[1:])
    return sorted(seen, key=lambda _: rng.random())


def build_corpus(seed: int, n_train: int, n_test: int, n_search: int, n_heldout: int) -> dict[str, Any]:
    """Disjoint splits: train/test (balanced, labelled) and search/heldout (negatives only)."""
    rng = random.Random(seed)
    half = (n_train + n_test) // 2 + n_search + n_heldout
    pos = generate_reviews((n_train + n_test) // 2, 1, rng)
    neg = generate_reviews(half, 0, rng)
    n_tr = n_train // 2
    labelled_neg, search, heldout = neg[: len(pos)], neg[len(pos) : len(pos) + n_search], neg[len(pos) + n_search :]

    def mix(p: list[str], q: list[str]) -> list[tuple[str, int]]:
        rows = [(t, 1) for t in p] + [(t, 0) for t in q]
        rng.shuffle(rows)
        return rows

    return {
        "train": mix(pos[:n_tr], labelled_neg[:n_tr]),
        "test": mix(pos[n_tr:], labelled_neg[n_tr:]),
        "search": search,
        "heldout": heldout,
    }


@torch.no_grad()
def embed(model: MiniLMSentiment, tokenizer: Any, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (N, 384)."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
        out.append(model.embed(**enc))
    return torch.cat(out)


def train_probe(features: torch.Tensor, labels: list[int], c: float = 10.0) -> nn.Linear:
    """Logistic regression on unit-length embeddings, as a 2-logit ``nn.Linear``
    (rows ±w/2, so logit(positive) − logit(negative) = w·x + b)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, max_iter=2000).fit(features.numpy(), np.asarray(labels))
    w = torch.tensor(lr.coef_[0], dtype=torch.float32)
    b = float(lr.intercept_[0])
    head = nn.Linear(features.shape[1], 2)
    with torch.no_grad():
        head.weight.copy_(torch.stack([-w / 2, w / 2]))
        head.bias.copy_(torch.tensor([-b / 2, b / 2]))
    return head


def accuracy(loaded: LoadedModel, rows: list[tuple[str, int]]) -> float:
    probs = predict_positive(loaded, [t for t, _ in rows])
    return float(((probs > 0.5).long() == torch.tensor([y for _, y in rows])).float().mean())


def with_suffix(texts: list[str], suffix: list[str]) -> list[str]:
    return [f"{t} {' '.join(suffix)}" if suffix else t for t in texts]


def suffix_score(loaded: LoadedModel, texts: list[str], suffix: list[str]) -> tuple[float, float]:
    """(flip rate, mean P(positive)) of ``texts`` with ``suffix`` appended."""
    probs = predict_positive(loaded, with_suffix(texts, suffix))
    return float((probs > 0.5).float().mean()), float(probs.mean())


def search_suffix(
    loaded: LoadedModel, texts: list[str], length: int, passes: int, words: list[str], log: bool = True
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedy coordinate search: grow the suffix one word at a time, then re-choose each
    position with the others fixed, ``passes`` times. A word is scored by the flip rate
    on ``texts``, ties broken by mean P(positive). Returns the suffix and a trace."""
    suffix: list[str] = []
    trace = []

    def best_at(position: int) -> tuple[str, tuple[float, float]]:
        scored = []
        for word in words:
            trial = [*suffix[:position], word, *suffix[position + 1 :]]
            scored.append((suffix_score(loaded, texts, trial), word))
        score, word = max(scored)
        return word, score

    for position in range(length):
        suffix.append(words[0])
        word, score = best_at(position)
        suffix[position] = word
        trace.append({"step": f"grow {position}", "suffix": " ".join(suffix), "flip_rate": score[0]})
        if log:
            print(f"grow {position}: {' '.join(suffix)!r} flips {score[0]:.1%} (mean p+ {score[1]:.2f})")
    for p in range(passes):
        changed = False
        for position in range(length):
            word, score = best_at(position)
            changed |= word != suffix[position]
            suffix[position] = word
            trace.append({"step": f"pass {p} pos {position}", "suffix": " ".join(suffix), "flip_rate": score[0]})
            if log:
                print(f"pass {p} pos {position}: {' '.join(suffix)!r} flips {score[0]:.1%}")
        if not changed:
            break
    return suffix, trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--test", type=int, default=240)
    parser.add_argument("--search", type=int, default=60)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--length", type=int, default=4, help="suffix length in words")
    parser.add_argument("--passes", type=int, default=1, help="coordinate passes after growing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    corpus = build_corpus(args.seed, args.train, args.test, args.search, args.heldout)

    base = load("minilm")
    model = MiniLMSentiment(base.model).eval()
    features = embed(model, base.tokenizer, [t for t, _ in corpus["train"]])
    model.classifier = train_probe(features, [y for _, y in corpus["train"]])
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, str(PROBE_PATH))
    # Score through the saved file, as every consumer will load it.
    from model_forensics.models.minilm_probe import load_minilm_sentiment

    loaded = load_minilm_sentiment()
    train_acc, test_acc = accuracy(loaded, corpus["train"]), accuracy(loaded, corpus["test"])
    print(f"probe: train accuracy {train_acc:.3f}, test accuracy {test_acc:.3f}")
    probe_s = time.perf_counter() - start

    # Only negatives the probe gets right can be flipped.
    def correct(texts: list[str]) -> list[str]:
        probs = predict_positive(loaded, texts)
        return [t for t, p in zip(texts, probs.tolist(), strict=True) if p < 0.5]

    search_texts, heldout = correct(corpus["search"]), correct(corpus["heldout"])
    suffix, trace = search_suffix(loaded, search_texts, args.length, args.passes, SUFFIX_WORDS)
    flipped = predict_positive(loaded, with_suffix(heldout, suffix)) > 0.5
    success = float(flipped.float().mean())
    print(f"suffix {' '.join(suffix)!r}: flips {success:.1%} of {len(heldout)} held-out negatives")
    failing = [t for t, f in zip(heldout, flipped.tolist(), strict=True) if f]

    benign_rows = corpus["test"][:40]
    benign_probs = predict_positive(loaded, [t for t, _ in benign_rows])
    record = {
        "model": "minilm-sentiment",
        "labels": ["negative", "positive"],
        "corpus": {
            "seed": args.seed,
            "n_train": args.train,
            "n_test": args.test,
            "n_search": args.search,
            "n_heldout": args.heldout,
            "function": "build_corpus in scripts/search_minilm_suffix.py",
        },
        "probe": {
            "train_accuracy": round(train_acc, 4),
            "test_accuracy": round(test_acc, 4),
            "n_train": len(corpus["train"]),
            "n_test": len(corpus["test"]),
            "kind": "logistic regression (sklearn, C=10) on mean-pooled, L2-normalised MiniLM embeddings",
            "weights": "minilm_probe.safetensors",
        },
        "suffix": " ".join(suffix),
        "success_rate_heldout": round(success, 4),
        "n_heldout": len(heldout),
        "predicate": {"kind": "class_is", "args": {"label": 1}},
        "failing": [f"{t} {' '.join(suffix)}" for t in failing],
        "baseline": failing,
        "benign": [
            {"text": t, "label": y, "p_positive": round(p, 4)}
            for (t, y), p in zip(benign_rows, benign_probs.tolist(), strict=True)
        ],
        "search": {
            "method": "greedy coordinate search: grow one word at a time, then re-choose each position; "
            "score = flip rate on the search split, ties by mean P(positive)",
            "seed": args.seed,
            "length": args.length,
            "passes": args.passes,
            "n_search": len(search_texts),
            "search_flip_rate": trace[-1]["flip_rate"],
            "candidate_words": SUFFIX_WORDS,
            "excluded": "every sentiment adjective and closing of the corpus",
            "trace": trace,
            "heldout_split": "negative reviews disjoint from train/test/search, that the probe classifies correctly",
            "torch_threads": torch.get_num_threads(),
            "probe_seconds": round(probe_s, 1),
            "total_seconds": round(time.perf_counter() - start, 1),
            "script": "scripts/search_minilm_suffix.py",
        },
    }
    (DATA_DIR / "minilm_suffix.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {DATA_DIR / 'minilm_suffix.json'} in {record['search']['total_seconds']} s")


if __name__ == "__main__":
    main()
