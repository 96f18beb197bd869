"""Zero/few-shot task accuracy through lm-evaluation-harness, on an in-memory model.

The harness does all prompting and scoring; moecarve only wraps the model already in memory
(lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok)), so a freshly carved model is
evaluated without saving and reloading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import MoecarveError

# the tasks of the CMoE / CD-MoE evaluations
STANDARD_TASKS = ["piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande", "sciq", "mmlu"]


class TaskError(MoecarveError, ValueError):
    """Bad task settings, or a task lm_eval cannot find or load."""


@dataclass(frozen=True)
class TaskConfig:
    """Which harness tasks to run and how.

    tasks: lm_eval task or group names. num_fewshot: None = each task's default.
    limit: examples per task (for quick runs; None = all). include_path: a folder of extra
    task YAMLs (lm_eval's TaskManager(include_path=...)).
    """

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8
    include_path: str | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.tasks or any(not t.strip() for t in self.tasks):
            raise TaskError(f"tasks must be a non-empty list of task names, got {list(self.tasks)!r}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise TaskError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise TaskError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise TaskError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise TaskError(f"task include path {self.include_path!r} is not a folder")

    @classmethod
    def parse(cls, tasks: str, **kw) -> "TaskConfig":
        """From a comma-separated list such as "piqa,arc_easy"."""
        return cls(tasks=tuple(t.strip() for t in tasks.split(",")), **kw)


@dataclass
class TaskResult:
    """A task's metrics (e.g. {"acc": 0.61, "acc_norm": 0.64}); `accuracy` is acc."""

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    n_samples: int | None = None

    @property
    def accuracy(self) -> float:
        return self.metrics.get("acc", float("nan"))


def _metrics(entry: dict) -> dict[str, float]:
    """lm_eval's "acc,none" / "acc_stderr,none" entries -> {"acc": ...}, numbers only."""
    out = {}
    for key, value in entry.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
            out[metric] = float(value)
    return out


def run_tasks(model: nn.Module, tokenizer, cfg: TaskConfig) -> dict[str, TaskResult]:
    """Run the harness on `model` (in memory, already on its device); {task: TaskResult}.

    Groups (mmlu) report their aggregate under the group name, as lm_eval does.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    tm = TaskManager(include_path=cfg.include_path)
    missing = [t for t in cfg.tasks if not tm.match_tasks([t])]
    if missing:
        hint = "" if cfg.include_path else " (pass --include-path for local task YAMLs)"
        raise TaskError(f"lm_eval knows no task {', '.join(missing)}{hint}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=cfg.batch_size)
    was_training = model.training
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=tm,
            log_samples=False, bootstrap_iters=0, verbosity="ERROR", random_seed=cfg.seed,
            numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
        )  # fmt: skip
    except Exception as e:  # dataset not cached, bad YAML ...: one clear line for the CLI
        raise TaskError(f"lm_eval could not run {', '.join(cfg.tasks)}: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    n = out.get("n-samples", {})
    return {
        t: TaskResult(t, _metrics(out["results"][t]), (n.get(t) or {}).get("effective"))
        for t in cfg.tasks
        if t in out["results"]
    }
