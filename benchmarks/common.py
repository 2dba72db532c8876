"""Shared helpers of the benchmark scripts (compare_reference, sweep, truthfulqa).

Argument parsing shared by the three CLIs, model loading (embedded SmolLM2 or tiny random
models), the TruthfulQA question reader, statistics (median, safe ratio, percentile bootstrap),
a peak-memory meter, machine description and CSV / JSON / JSONL writers. Nothing here prints:
helpers log, the scripts' ``main`` functions print.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the scripts run as files: make ``mahalo`` importable
    sys.path.insert(0, str(REPO_ROOT))

from mahalo.app.config import ModelConfig, ModelsConfig  # noqa: E402
from mahalo.app.load import EMBEDDED_TRUTH_HEAD  # noqa: E402
from mahalo.app.registry import load_models  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_QUESTIONS = REPO_ROOT.parent / "shared" / "data" / "truthfulqa" / "questions_dev.csv"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
MODEL_KINDS = ("embedded", "tiny")
NOT_MEASURED = "not yet measured"


# --------------------------------------------------------------------------- CLI pieces


def int_list(text: str) -> list[int]:
    """Parse ``"1,2,4"`` into ``[1, 2, 4]`` (argparse ``type``); each value must be >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def str_list(text: str) -> list[str]:
    """Parse ``"a,b"`` into ``["a", "b"]`` (argparse ``type``)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a non-empty comma-separated list")
    return values


def add_common_args(parser: argparse.ArgumentParser, *, prompts_default: int, prompts_flag: str = "--num-prompts") -> None:
    """Options every benchmark takes: models, device, threads, prompts, output, machine."""
    g = parser.add_argument_group("models and machine")
    g.add_argument("--models", choices=MODEL_KINDS, default="embedded",
                   help="embedded: SmolLM2-135M-Instruct policy + its truth reward model (default); "
                        "tiny: random tiny models for smoke tests (numbers meaningless)")
    g.add_argument("--truth-head", default=None,
                   help="score-head file of the truth reward model (embedded only; default: the "
                        "committed mahalo/assets/smollm2_135m_truth_head.safetensors)")
    g.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or auto (embedded only; tiny models stay on the CPU)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (embedded only; tiny models are float32)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice); set OMP_NUM_THREADS too")
    g.add_argument("--machine", default="",
                   help="free-text machine description recorded in the outputs (e.g. 'AMD EPYC 7B13, 2 vCPU')")
    d = parser.add_argument_group("prompts and output")
    d.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS,
                   help=f"TruthfulQA CSV with a 'Question' column (default: {DEFAULT_QUESTIONS})")
    d.add_argument(prompts_flag, type=int, default=prompts_default, dest="num_prompts",
                   help=f"use the first K questions (default: {prompts_default})")
    d.add_argument("--seed", type=int, default=0, help="sampling seed of every decode (default: 0)")
    d.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help=f"where result files go (default: {DEFAULT_OUT_DIR})")
    d.add_argument("--tag", default="", help="suffix of the output file names, to keep several runs apart")


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count when ``threads`` is given."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def out_stem(name: str, tag: str) -> str:
    """File stem ``name`` or ``name_tag``."""
    return f"{name}_{tag}" if tag else name


# --------------------------------------------------------------------------- models


@dataclass
class BenchModels:
    """The loaded policy, a ``(model, tokenizer)`` pair, and the truth reward model's adapter
    (``.model``, ``.tokenizer``, ``.score_at``)."""

    policy: tuple[Any, Any]
    truth: Any
    device: torch.device
    load_s: float
    description: dict[str, Any] = field(default_factory=dict)


def models_config(kind: str, device: str = "cpu", dtype: str = "float32", truth_head: str | None = None,
                  shared: bool = False) -> ModelsConfig:
    """The :class:`ModelsConfig` of ``--models KIND`` (truth objective only); ``shared``: the
    embedded truth head read from the policy's own hidden states (the CLI's default), else a
    separate reward model."""
    if kind == "tiny":
        return ModelsConfig(
            name="tiny",
            policy=ModelConfig(kind="tiny", seed=0),
            rewards={"truth": ModelConfig(kind="tiny", seed=1)},
        )
    if kind != "embedded":
        raise ValueError(f"unknown --models {kind!r}: choose one of {list(MODEL_KINDS)}")
    return ModelsConfig(
        name="embedded",
        policy=ModelConfig(kind="embedded", dtype=dtype, device=device),
        # a separate reward model unless ``shared`` (the reference decoder needs one; compare_reference.py
        # also runs the head on the policy's backbone from it)
        rewards={"truth": ModelConfig(kind="embedded", dtype=dtype, device=device, head_file=truth_head,
                                      share_backbone=shared)},
    )


def load_bench_models(kind: str, device: str = "cpu", dtype: str = "float32", truth_head: str | None = None,
                      shared: bool = False) -> BenchModels:
    """Load the policy and the truth reward model of ``--models KIND``.

    Raises:
        ValueError: a missing embedded model or truth head (the message says how to fix it).
    """
    cfg = models_config(kind, device, dtype, truth_head, shared and kind == "embedded")
    if kind == "embedded":  # fail before the slow policy load, with the fix in the message
        head = Path(truth_head) if truth_head else EMBEDDED_TRUTH_HEAD
        if not head.is_file():
            raise ValueError(f"truth reward head not found: {head} (train or fetch it, or pass --truth-head FILE)")
    t0 = time.perf_counter()
    loaded = load_models(cfg, ["truth"])
    load_s = time.perf_counter() - t0
    dev = next(loaded.policy[0].parameters()).device
    desc = {
        "models": kind,
        "policy": type(loaded.policy[0]).__name__,
        "policy_params": sum(p.numel() for p in loaded.policy[0].parameters()),
        "truth_rm": type(getattr(loaded.rewards["truth"], "model", loaded.rewards["truth"])).__name__,
        "truth_score_at": loaded.rewards["truth"].score_at,
        "truth_head": truth_head or ("embedded default" if kind == "embedded" else "random"),
        "dtype": dtype if kind == "embedded" else "float32",
        "device": str(dev),
    }
    log.info("models %s loaded in %.1f s on %s", kind, load_s, dev)
    return BenchModels(loaded.policy, loaded.rewards["truth"], dev, load_s, desc)


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """One TruthfulQA question with its reference answers."""

    index: int
    question: str
    best: str = ""
    correct: tuple[str, ...] = ()
    incorrect: tuple[str, ...] = ()


def split_answers(text: str | None) -> tuple[str, ...]:
    """TruthfulQA's ``"; "``-separated answer list, stripped, empties dropped."""
    return tuple(a.strip() for a in (text or "").split(";") if a.strip())


def read_questions(path: str | os.PathLike[str], limit: int | None = None) -> list[Question]:
    """The first ``limit`` rows (all when None) of a TruthfulQA CSV.

    Raises:
        ValueError: a missing file, no ``Question`` column, or no questions.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"questions file not found: {file} (pass --questions PATH)")
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if "Question" not in (reader.fieldnames or []):
            raise ValueError(f"{file} has no 'Question' column (columns: {reader.fieldnames})")
        out = []
        for row in reader:
            if limit is not None and len(out) >= limit:
                break
            out.append(Question(
                index=len(out),
                question=row["Question"].strip(),
                best=(row.get("Best Answer") or "").strip(),
                correct=split_answers(row.get("Correct Answers")),
                incorrect=split_answers(row.get("Incorrect Answers")),
            ))
    if not out:
        raise ValueError(f"{file} holds no questions")
    if limit is not None and len(out) < limit:
        log.warning("asked for %d questions, %s holds only %d", limit, file, len(out))
    return out


# --------------------------------------------------------------------------- statistics


def finite(values: Iterable[float]) -> list[float]:
    """The finite values of ``values`` (NaN / inf / None dropped)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    vals = finite(values)
    return float(np.median(vals)) if vals else math.nan


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    vals = finite(values)
    return float(np.mean(vals)) if vals else math.nan


def ratio(num: float, den: float) -> float:
    """``num / den``; NaN when either is missing or ``den`` is 0."""
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den == 0:
        return math.nan
    return float(num) / float(den)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval."""

    point: float
    low: float
    high: float


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``stat`` over ``values``.

    Draws ``n_resamples`` resamples with replacement (numpy ``default_rng(seed)``), computes
    ``stat`` on each and returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
    (numpy's default linear interpolation). NaN everywhere for an empty input.
    """
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_resamples, data.size))
    stats = np.apply_along_axis(stat, 1, data[idx]) if stat is not np.mean else data[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(float(stat(data)), float(low), float(high))


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory while a block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (method ``cuda_max_allocated``).
    CPU with psutil: the process RSS sampled every ``interval_s`` by a thread
    (``psutil_rss_sampled``; short spikes between samples can be missed). CPU without psutil:
    ``ru_maxrss``, the lifetime peak, so ``delta_mb`` is only the growth above the earlier peak
    (``ru_maxrss``). ``peak_mb`` is the absolute peak, ``delta_mb`` the peak minus the start.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.01) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = math.nan
        self.delta_mb = math.nan
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: Any = None
        self._base = 0
        self._peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base, self.method = torch.cuda.memory_allocated(self.device), "cuda_max_allocated"
            return self
        try:
            import psutil
        except ImportError:
            self._base, self.method = _ru_maxrss_bytes(), "ru_maxrss"
            return self
        self._proc, self.method = psutil.Process(), "psutil_rss_sampled"
        self._base = self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "ru_maxrss":
            peak = _ru_maxrss_bytes()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = peak / 2**20
        self.delta_mb = max(0, peak - self._base) / 2**20


def _ru_maxrss_bytes() -> int:
    """Lifetime peak RSS of this process in bytes (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# --------------------------------------------------------------------------- machine


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def machine_info(device: torch.device | str = "cpu", description: str = "") -> dict[str, Any]:
    """What ran the benchmark: the given description plus what Python can see."""
    import transformers

    info: dict[str, Any] = {
        "description": description or "(not given: pass --machine)",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


# --------------------------------------------------------------------------- files


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def ci_cell(point: float, low: float, high: float, digits: int = 2) -> str:
    """A table cell ``point [low, high]``."""
    return f"{fmt(point, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no plots")
        return None
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write ``fig`` as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN -> null); create the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV, columns ``fields`` (default: every key, first-seen order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fields is None:
        fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in fields})
    return path


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    return value


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` as JSON lines (NaN -> null), replacing the file in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return path


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, flushed and fsynced (an interrupt loses nothing written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(record), ensure_ascii=False) + "\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a JSONL file; a torn last line (killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping an unreadable line (interrupted write?)", path, lineno)
    return records


def repair_jsonl_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) so appended records stay one per line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)


def console(**kwargs: Any) -> "Any":
    """A rich console on stdout, 140 columns wide when stdout is not a terminal (logs, tee)."""
    import shutil

    from rich.console import Console

    width = None if sys.stdout.isatty() else max(140, shutil.get_terminal_size((140, 24)).columns)
    return Console(width=width, highlight=False, **kwargs)


def machine_line(info: dict[str, Any]) -> str:
    """The machine description in one line."""
    keys = ("description", "processor", "cpu_count", "torch_threads", "ram_gib", "gpu", "torch",
            "transformers", "git_commit")
    return "machine: " + ", ".join(f"{k}={info[k]}" for k in keys if k in info)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, NaN/None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def load_run(args: argparse.Namespace, console: Any) -> tuple[list[Question], BenchModels, dict[str, Any]]:
    """Read ``--questions``, load ``--models`` and print the machine line.

    Raises:
        ValueError: a missing questions file, embedded model or truth head (the message says how).
    """
    questions = read_questions(args.questions, args.num_prompts)
    models = load_bench_models(args.models, args.device, args.dtype, args.truth_head)
    machine = machine_info(models.device, args.machine)
    console.print(machine_line(machine), style="dim", markup=False)
    return questions, models, machine


def start(args: argparse.Namespace) -> "Any":
    """What every script does first: logging (``--verbose``), ``--threads``; returns the console."""
    setup_logging(args.verbose)
    set_threads(args.threads)
    return console()


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (stdout is for tables and the result lines)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
