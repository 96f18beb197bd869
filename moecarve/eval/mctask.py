"""A local multiple-choice task for lm_eval, built from any held-out text (no download needed).

Each example is a passage cut in two: the model sees the first part and must pick its true
continuation among `n_choices` endings, the others taken from other passages (a HellaSwag-like
cloze). The task is a YAML + JSONL pair that lm_eval loads with TaskManager(include_path=folder).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import MoecarveError

TASK_NAME = "moecarve_continuation"

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


class TaskBuildError(MoecarveError, ValueError):
    """The text is too short for the requested task."""


def _passages(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Single-line passages of prose-like length (blank-line separated paragraphs, whitespace folded)."""
    out = []
    for para in text.split("\n\n"):
        p = " ".join(para.split())
        if min_chars <= len(p) <= max_chars and p.count(" ") >= 8:
            out.append(p)
    return out


def build_examples(
    text: str, n: int = 200, n_choices: int = 4, seed: int = 0, min_chars: int = 80, max_chars: int = 400
) -> list[dict]:
    """n examples {"context", "choices", "label"}; each ending starts with a space, cut at a word."""
    if n_choices < 2:
        raise TaskBuildError(f"n_choices must be >= 2, got {n_choices}")
    passages = _passages(text, min_chars, max_chars)
    if len(passages) < n + n_choices:
        raise TaskBuildError(
            f"the text has {len(passages)} usable passages; {n} examples need at least {n + n_choices}"
        )
    rng = random.Random(seed)
    rng.shuffle(passages)
    cuts = []
    for p in passages:
        words = p.split(" ")
        k = max(4, int(len(words) * 0.6))  # the context is ~60% of the passage
        cuts.append((" ".join(words[:k]), " " + " ".join(words[k:])))
    examples = []
    for i in range(n):
        context, ending = cuts[i]
        others = [cuts[j][1] for j in rng.sample([j for j in range(len(cuts)) if j != i], n_choices - 1)]
        label = rng.randrange(n_choices)
        choices = others[:label] + [ending] + others[label:]
        examples.append({"context": context, "choices": choices, "label": label})
    return examples


def write_task(folder: str | Path, examples: list[dict], name: str = TASK_NAME) -> Path:
    """Write `name`.yaml and `name`.jsonl into folder; returns the folder (pass it as include_path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    (folder / f"{name}.yaml").write_text(_YAML.format(name=name, data=json.dumps(str(data))))
    return folder


def main(argv: list[str] | None = None) -> None:
    """python -m moecarve.eval.mctask TEXT OUT_DIR [--n 200] [--skip-chars N]: write the task folder."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m moecarve.eval.mctask", description=__doc__)
    p.add_argument("text", help="a held-out text file")
    p.add_argument("out", help="task folder to write (pass it to --include-path)")
    p.add_argument("--n", type=int, default=200, help="examples")
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--skip-chars", type=int, default=0, help="ignore the first N characters (e.g. the perplexity part)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    text = Path(a.text).read_text(encoding="utf-8", errors="replace")[a.skip_chars :]
    folder = write_task(a.out, build_examples(text, a.n, a.choices, a.seed))
    print(f"wrote task {TASK_NAME!r} ({a.n} examples) to {folder}")


if __name__ == "__main__":
    main()
