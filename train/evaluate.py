"""Score a finished run on benchmarks with EleutherAI's lm-evaluation-harness, on tasks defined locally.

    python -m train.evaluate run=outputs/<date>/<time> tasks=oasst_reply_choice
        [weights=auto|adapter|merged|model] [batch_size=4] [limit=<items per task>] [chat_template=true]
        [include=<task folder>[,<task folder>...]]

Tasks are lm-eval task YAMLs in ``train/eval_tasks/`` (shipped: ``oasst_reply_choice``) and in the
``include=`` folders; lm-eval's own catalogue is left out, as its tasks download their data from the Hub. A
``data_files`` path relative to a task's YAML is read from the YAML's folder (lm-eval alone would read it
from the current directory); for tasks named here, not for tasks inside a named group.

Weights are chosen and loaded as ``python -m train.chat`` does (its docstring): the adapter on the run's
base, 4-bit for QLoRA, or ``model/``; on the first GPU or the CPU, in the run's compute dtype.
``chat_template=true`` (the default) puts each prompt in the Llama 3.1 Instruct format these runs are trained
on, the choice right after the assistant header; ``chat_template=false`` scores raw text (prompt, the task's
delimiter, choice), as published base-model numbers are.

Writes ``<run>/eval/<task>-results.json`` (lm-eval's results, version, item count and config for the task,
with the weights, options and time) and ``<run>/eval/<task>-samples.jsonl`` (each item's prompt and
log-likelihoods), replacing an earlier evaluation of the same task; prints lm-eval's table on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.chat import WEIGHTS, choose_weights, key_values, load_chat_model
from train.config import ConfigError
from train.run.run_dir import run_config

log = logging.getLogger("train.evaluate")

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
EVAL_DIR = "eval"  # inside the run directory
DEFAULTS = {"weights": "auto", "batch_size": "4", "chat_template": "true", "include": ""}
OPTIONS = ("run", "tasks", "limit", *DEFAULTS)
BOOLEANS = {"true": True, "false": False}
# datasets' packaged loaders, whose data_files are file paths (a Hub dataset's are paths inside its repo)
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
PER_TASK = ("results", "versions", "n-shot", "higher_is_better", "n-samples", "configs")  # lm-eval's keys
# lm-eval 0.4.13 (models/huggingface.py, HFLM.__init__) warns whenever it is given a model object, not a
# name: other arguments "may be ignored", it "assumes a single-process call". Both hold here by design (one
# process, the model placed by train.chat), so a user has nothing to act on.
_MODEL_OBJECT_NOTES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")
USAGE = (
    "usage: python -m train.evaluate run=<run directory> tasks=<task>[,<task>...] "
    "[weights=auto|adapter|merged|model] [batch_size=4] [limit=<items per task>] [chat_template=true|false] "
    "[include=<task folder>[,...]]"
)


@dataclass(frozen=True)
class Options:
    """The command line, typed (module docstring)."""

    run: Path
    tasks: tuple[str, ...]
    weights: str
    batch_size: int
    limit: int | None
    chat_template: bool
    include: tuple[Path, ...]


# ── before any weight: options and tasks ───────────────────────────────────────────────────
def whole_number(key: str, value: str) -> int:
    if not (value.isdigit() and int(value) >= 1):
        raise ConfigError(f"{key}={value}: expected a whole number >= 1")
    return int(value)


def parse(argv: list[str]) -> Options:
    """``key=value`` arguments over ``DEFAULTS``; ConfigError naming the key and the fix for any other key
    or a bad value."""
    options = {**DEFAULTS, **key_values(argv, OPTIONS)}
    tasks = tuple(name for name in options.get("tasks", "").split(",") if name)
    if not options.get("run"):
        raise ConfigError("run= is missing: the run directory to evaluate (outputs/<date>/<time>)")
    if not tasks:
        raise ConfigError("tasks= is missing: task names, comma-separated (shipped: oasst_reply_choice)")
    if options["weights"] not in WEIGHTS:
        raise ConfigError(f"weights={options['weights']}: expected one of {', '.join(WEIGHTS)}")
    if options["chat_template"] not in BOOLEANS:
        raise ConfigError(f"chat_template={options['chat_template']}: expected true or false")
    include = tuple(Path(folder) for folder in options["include"].split(",") if folder)
    for folder in include:
        if not folder.is_dir():
            raise ConfigError(f"include={folder}: no such directory; name a folder of lm-eval task YAMLs")
    return Options(
        run=Path(options["run"]),
        tasks=tasks,
        weights=options["weights"],
        batch_size=whole_number("batch_size", options["batch_size"]),
        limit=whole_number("limit", options["limit"]) if "limit" in options else None,
        chat_template=BOOLEANS[options["chat_template"]],
        include=include,
    )


def task_manager(include: tuple[Path, ...] = ()):
    """lm-eval's index of ``train/eval_tasks/`` and the ``include`` folders, without its own catalogue."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include)], include_defaults=False)


def local_data_files(yaml_path: Path, data_files):
    """``data_files`` (a path, a list, or a dict of them by split) with each relative path made absolute
    against ``yaml_path``'s folder; ConfigError naming the YAML for one that is not there."""
    if isinstance(data_files, dict):
        return {split: local_data_files(yaml_path, files) for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [local_data_files(yaml_path, files) for files in data_files]
    if "://" in data_files or Path(data_files).is_absolute():
        return data_files
    path = yaml_path.parent / data_files
    if not path.is_file():
        raise ConfigError(f"{yaml_path}: data_files {data_files} is not there ({path}); fix the path")
    return str(path)


def task_specs(manager, names: tuple[str, ...]) -> list:
    """What ``simple_evaluate`` takes for each task: its name, or, for a task reading local files, its YAML's
    config with those paths made absolute. ConfigError for a name no folder defines, listing those that do."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        folders = ", ".join(str(path) for path in manager.include_path)
        raise ConfigError(
            f"tasks={','.join(unknown)}: no such task in {folders}; tasks found there: "
            f"{', '.join(manager.all_tasks) or 'none'} (add a folder of your own with include=<dir>)"
        )
    specs = []
    for name in names:
        entry = manager.task_index[name]
        if entry.kind != Kind.TASK or entry.cfg.get("dataset_path") not in LOCAL_BUILDERS:
            specs.append(name)
            continue
        config = load_yaml(entry.yaml_path)  # as lm-eval's TaskFactory reads it: includes, !function resolved
        kwargs = config.get("dataset_kwargs") or {}
        if "data_files" in kwargs:
            kwargs["data_files"] = local_data_files(entry.yaml_path, kwargs["data_files"])
        specs.append(config)
    return specs


# ── the evaluation ─────────────────────────────────────────────────────────────────────────
def evaluate(model, tokenizer, specs: list, manager, options: Options) -> dict:
    """lm-eval's ``simple_evaluate`` on the loaded model: its results dict, each item's record in ``samples``.

    ``HFLM`` takes a model object as it is: it only uses ``.config``, ``.device``, ``.tie_weights()`` and
    ``model(ids).logits``, which a ``PeftModel`` forwards to its base. So an adapter is scored as trained
    (4-bit base for QLoRA), not merged first: merging changes no score, and on a 4-bit base it would mean
    dequantizing it (``train.chat``'s reason)."""
    import datasets.config
    from lm_eval import simple_evaluate

    # datasets 5.2 (load.py, increase_load_count) sends a HEAD request to S3, 3 s timeout, to count each load
    # of its json/csv loaders; off, so a local task reaches for no network
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    logging.getLogger("lm_eval.models.huggingface").addFilter(
        lambda record: not str(record.msg).startswith(_MODEL_OBJECT_NOTES)
    )
    return simple_evaluate(
        model=harness_model(model, tokenizer, options.batch_size),
        tasks=specs,
        limit=options.limit,
        apply_chat_template=options.chat_template,
        task_manager=manager,
        log_samples=True,
    )


def harness_model(model, tokenizer, batch_size: int):
    """lm-eval's ``HFLM`` around the loaded model. Prompts in the chat format carry the date the training data
    does (``data.chat.DEFAULT_DATE_STRING``): Llama 3.2's template would otherwise write today's."""
    from lm_eval.models.huggingface import HFLM

    from data.chat import DEFAULT_DATE_STRING

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                chat_template_args={"date_string": DEFAULT_DATE_STRING})  # fmt: skip


def provenance(options: Options, weights: Path, model, started: float) -> dict:
    """What each results file says about how it was made, beside lm-eval's numbers."""
    import lm_eval

    return {
        "run": str(options.run),
        "weights": str(weights),
        "dtype": str(model.dtype),
        "device": str(model.device),
        "chat_template": options.chat_template,
        "limit": options.limit,
        "batch_size": options.batch_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "lm_eval_version": lm_eval.__version__,
    }


def write_results(results: dict, eval_dir: Path, header: dict) -> list[Path]:
    """``<task>-results.json`` (``header`` and lm-eval's entries for the task) and ``<task>-samples.jsonl``
    for each task and group scored; the paths written."""
    from lm_eval.utils import handle_non_serializable

    eval_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in results["results"]:
        record = {"task": name, **header, **{key: results.get(key, {}).get(name) for key in PER_TASK}}
        path = eval_dir / f"{name}-results.json"
        path.write_text(json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
        written.append(path)
        if name in results.get("samples", {}):
            path = eval_dir / f"{name}-samples.jsonl"
            lines = (json.dumps(item, default=handle_non_serializable) for item in results["samples"][name])
            path.write_text("".join(line + "\n" for line in lines))
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    try:
        options = parse(argv)
        weights = choose_weights(options.run, run_config(options.run), options.weights)
        manager = task_manager(options.include)
        specs = task_specs(manager, options.tasks)
    except ConfigError as error:
        print(f"error: {error}\n{USAGE}", file=sys.stderr)
        return 2
    started = time.time()
    model, tokenizer = load_chat_model(options.run, weights)
    log.info("loaded %s on %s (%s)", weights, model.device, model.dtype)
    results = evaluate(model, tokenizer, specs, manager, options)
    for path in write_results(results, options.run / EVAL_DIR, provenance(options, weights, model, started)):
        log.info("wrote %s", path)
    from lm_eval.utils import make_table

    print(make_table(results))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main(sys.argv[1:]))
