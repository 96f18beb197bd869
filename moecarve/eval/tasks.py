"""Zero/few-shot task accuracy through lm-evaluation-harness, on an in-memory model.

The harness does all prompting and scoring; moecarve only wraps the model already in memory
(lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok)), so a freshly carved model is
evaluated without saving and reloading it. Results keep what a reader needs to trust and
reproduce them: each metric with its standard error, the sample counts, the few-shot count, the
task version, and (task_report) the settings and the lm_eval version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    task YAMLs (lm_eval's TaskManager(include_path=...)). bootstrap_iters: resamples for the
    standard errors of metrics without a closed form (f1, bleu, ...; acc and acc_norm have one,
    so their stderr costs nothing); 0 computes no standard error.
    """

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8
    include_path: str | None = None
    seed: int = 0
    bootstrap_iters: int = 1000

    def __post_init__(self):
        if not self.tasks or any(not t.strip() for t in self.tasks):
            raise TaskError(f"tasks must be a non-empty list of task names, got {list(self.tasks)!r}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise TaskError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise TaskError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise TaskError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.bootstrap_iters < 0:
            raise TaskError(f"bootstrap_iters must be >= 0, got {self.bootstrap_iters}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise TaskError(f"task include path {self.include_path!r} is not a folder")

    @classmethod
    def parse(cls, tasks: str, **kw) -> "TaskConfig":
        """From a comma-separated list such as "piqa,arc_easy"."""
        return cls(tasks=tuple(t.strip() for t in tasks.split(",")), **kw)


@dataclass
class TaskResult:
    """One task's (or group's) results as lm_eval reports them.

    metrics: {"acc": 0.61, "acc_norm": 0.64, ...}; stderr: their standard errors (same keys,
    where lm_eval computed one); n_samples: examples scored (after limit), n_original: examples
    in the task; num_fewshot: few-shot examples per prompt; version: the task's version.
    `accuracy` is acc.
    """

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    n_samples: int | None = None
    stderr: dict[str, float] = field(default_factory=dict)
    n_original: int | None = None
    num_fewshot: int | None = None
    version: str | int | float | None = None

    @property
    def accuracy(self) -> float:
        return self.metrics.get("acc", float("nan"))

    def to_dict(self) -> dict:
        return asdict(self)


def _metrics(entry: dict) -> tuple[dict[str, float], dict[str, float]]:
    """lm_eval's "acc,none" / "acc_stderr,none" entries -> ({"acc": ...}, {"acc": stderr}), numbers only
    (lm_eval writes "N/A" where it has no standard error)."""
    metrics, stderr = {}, {}
    for key, value in entry.items():
        metric, _, filt = key.partition(",")
        if filt != "none" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if metric.endswith("_stderr"):
            stderr[metric.removesuffix("_stderr")] = float(value)
        else:
            metrics[metric] = float(value)
    return metrics, stderr


def _result(task: str, out: dict) -> TaskResult:
    metrics, stderr = _metrics(out["results"][task])
    n = out.get("n-samples", {}).get(task) or {}
    return TaskResult(task, metrics, n.get("effective"), stderr, n.get("original"), out.get("n-shot", {}).get(task),
                      out.get("versions", {}).get(task))  # fmt: skip


def task_report(results: dict[str, TaskResult], cfg: TaskConfig) -> dict:
    """The JSON of a harness run: the lm_eval version, the settings, and every task's TaskResult."""
    from importlib.metadata import version

    settings = {k: v for k, v in asdict(cfg).items() if k != "tasks"}
    return {"lm_eval_version": version("lm_eval"), "settings": settings, "tasks": {t: r.to_dict() for t, r in results.items()}}


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
            log_samples=False, bootstrap_iters=cfg.bootstrap_iters, verbosity="ERROR", random_seed=cfg.seed,
            numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
        )  # fmt: skip
    except Exception as e:  # dataset not cached, bad YAML ...: one clear line for the CLI
        raise TaskError(f"lm_eval could not run {', '.join(cfg.tasks)}: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    return {t: _result(t, out) for t in cfg.tasks if t in out["results"]}
