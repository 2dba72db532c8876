"""Baseline: the paper's decoding loop as its public code runs it, re-implemented.

The MAHALO authors' guided decoder (repository ``pearls-lab/multiobj-align``, file
``prm_guided_decoding/mahdpo_hv_orm_guide.py``, method
``ORMGuidedSentenceLevelDecoder.decode_with_hidden_state``) is the baseline our engine is
benchmarked against. This module is our own re-implementation of that loop, written to
reproduce its *cost structure*: what is forwarded through which model, how often, at which
batch size, and what is copied.

How the reference runs (and what this module reproduces)
--------------------------------------------------------
* **One prompt, one prefill.** The chat prompt (user turn + generation prompt) is rendered and
  tokenised once and forwarded once through the policy with a cache; the cache and the logits
  of the last prompt position seed the first step. Reproduced.
* **Candidates one at a time, each on a deep copy of the cache.** For each of ``N`` candidates
  the reference ``copy.deepcopy``-s the policy's ``DynamicCache`` (so every step copies the
  whole prompt + accepted response K/V ``N`` times) and then samples token by token at
  batch 1: sample from the current logits, append; if the token is end-of-turn, stop *without
  forwarding it*; otherwise forward that single token through the copied cache, then decode
  the whole chunk so far (``skip_special_tokens=True``) and test the boundary. The last token
  of a chunk is therefore forwarded before the boundary test, so every non-end-of-turn token
  costs one policy forward, losers included. Before each sample it checks a per-step cap
  (``max_tokens_per_sentence``, 256) and the total budget (accepted tokens + this chunk's
  tokens ``>= max_total_tokens``). Reproduced, including both caps (``max_step_tokens``,
  ``max_new_tokens``).
* **Sampling.** ``softmax(logits / T)``; top-k applied to the *probabilities*
  (``torch.topk``, scatter into zeros, renormalise); top-p only when ``0 < top_p < 1`` (the
  reference's runs pass ``top_p=1.0``, i.e. disabled); ``torch.multinomial`` with an explicit
  generator; ``T <= 0`` means argmax. Reproduced (probabilities taken in float32).
* **Retries.** A candidate whose decoded text is empty is dropped and re-sampled unless it
  ended with end-of-turn, in which case it is kept as an empty "end-of-turn only" candidate;
  at most ``3 N`` attempts per step. If every kept candidate is end-of-turn-only, decoding
  stops without scoring. Reproduced.
* **Scoring from scratch.** The reward model scores ``accepted_text + candidate_text`` (plain
  string concatenation) as the assistant turn of a ``[user, assistant]`` conversation: the
  text is re-rendered with the chat template, re-tokenised and forwarded in full, without any
  cache, one conversation at a time (a ``text-classification`` pipeline with
  ``batch_size=1``), the reward being the raw logit of the single label. End-of-turn-only
  candidates are scored too (their response is just the accepted text). With ``N == 1`` the
  reference skips the reward model altogether. Reproduced.
* **Selection.** The first index of the maximal score wins. Decoding continues from *the
  winner's own cache copy* and the logits it ended with (no re-prefill, no extra copy); the
  losers' copies are dropped. Decoding stops when the winner ended with end-of-turn, when the
  budget is spent, or after ``max_sentences`` (100) non-empty chunks. Reproduced
  (``max_steps``).
* **Response text** is the concatenation of the chosen chunks' decoded texts (each decoded
  separately, special tokens skipped). Reproduced.

Where the reference differs, and what we aligned with mahalo for a fair comparison
-----------------------------------------------------------------------------------
* **Boundary rule.** Kept as the paper's own (it is the baseline): the chunk text alone (no
  context) after at least ``min_tokens_per_chunk`` = 8 tokens, either a paragraph break (chunk
  matches ``\\n{2,}$``, non-blank, and the last completed line is not a bare list marker) or
  sentence-final punctuation (``[.!?](?:["'\\)\\]]+)?\\s*$``), unless the last 8 characters of
  the right-stripped chunk end with one of ``e.g. i.e. etc. vs. cf. et al. Dr. Mr. Mrs. Ms.
  Prof.`` (case-sensitive) or the chunk's last line is a bare list marker (bullet ``-*\\u2022``,
  ``\\d+[.)]``, ``[A-Za-z][.)]``, ``(Step|Stage)\\s*\\d+[:.]``). :class:`PaperBoundary`. It runs on
  every token prefix, so it cuts inside "3.14" (at "3."), "e.g." (at "e.") or "U.S." (at "U.").
  mahalo's :class:`mahalo.steps.SentenceBoundary` confirms a boundary with the next token first
  (see ``benchmarks/README.md``), so the two engines may cut steps at different places.
* **Policy prompt.** The reference tokenises the rendered template with the tokenizer's
  default ``add_special_tokens=True`` (a second BOS for Llama 3). **Aligned:** we use
  :func:`mahalo.chat.generation_prompt_ids`.
* **Reward-model input.** The reference renders the full conversation, strips BOS from the
  text and lets the pipeline re-add it, so the score is read at the template's final token
  (``<|eot_id|>`` for Llama 3, but the ``\n`` after ``<|im_end|>`` for ChatML), and the
  sequence-classification head pools at the last non-pad token (if the pad token equals the
  end-of-turn token it would read one token earlier). Templates that ``trim`` message
  content (Llama 3's) also strip the response's outer whitespace there. **Aligned:** ids come from
  :func:`mahalo.chat.conversation_ids` with the same ``score_at`` as mahalo's reward model
  (``last_token`` is the paper's point; the embedded truth head reads ``end_of_turn``) and the
  reward is ``score(h[:, -1])`` on the unpadded batch-1 sequence.
* **Seeding.** The reference seeds a fresh generator per candidate with
  ``seed + 10007 * counter`` where the counter lives on the decoder object (it keeps growing
  across prompts). We draw every sample from one ``torch.Generator`` seeded with ``seed``:
  same cost, reproducible per call.
* **Multi-head policy.** The reference's MAHALO policy is a multi-head (ensemble) LM; here the
  policy is any causal LM (the reference's ``use_base_model_only`` path). Precision, device
  placement and the pipeline's tokenisation overhead are the caller's / out of scope.
* **Token accounting.** ``token_ids`` holds the chosen chunks' ids as sampled (a final
  end-of-turn token included); the budget counts them the same way the reference does.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mahalo.chat import Messages, conversation_ids, generation_prompt_ids
from mahalo.policy import stop_token_ids  # the same stop tokens as mahalo

logger = logging.getLogger(__name__)

REFERENCE_MAX_STEP_TOKENS = 256  # the reference's max_tokens_per_sentence
REFERENCE_MAX_STEPS = 100  # the reference's max_sentences
ATTEMPTS_PER_CANDIDATE = 3  # the reference tries at most 3 * N samples per step

# The paper's boundary rule (see the module docstring), re-implemented.
_PAPER_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[A-Za-z][.)]|(?:Step|Stage)\s*\d+[:.])\s*$")
_PAPER_SENTENCE_END = re.compile(r"[.!?](?:[\"'\)\]]+)?\s*$")
_PAPER_PARAGRAPH = re.compile(r"\n{2,}$")
PAPER_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "et al.", "Dr.", "Mr.", "Mrs.", "Ms.", "Prof.")


@dataclass(frozen=True)
class PaperBoundary:
    """The paper's step rule on the chunk's text alone, tested after every token."""

    min_tokens: int = 8

    def __call__(self, chunk: str, n_tokens: int) -> bool:
        if n_tokens < self.min_tokens:
            return False
        return self._paragraph(chunk) or self._sentence(chunk)

    @staticmethod
    def _paragraph(chunk: str) -> bool:
        body = chunk.rstrip("\n")
        if not chunk.strip() or not _PAPER_PARAGRAPH.search(chunk) or not body:
            return False
        return not _PAPER_LIST_MARKER.match(body.rsplit("\n", 1)[-1])

    @staticmethod
    def _sentence(chunk: str) -> bool:
        if not _PAPER_SENTENCE_END.search(chunk) or chunk.rstrip()[-8:].endswith(PAPER_ABBREVIATIONS):
            return False
        return not _PAPER_LIST_MARKER.match(chunk.rsplit("\n", 1)[-1].rstrip())


@dataclass
class ReferenceResult:
    """Outcome of :func:`reference_decode`.

    Attributes:
        text: the response (chosen chunks' texts concatenated).
        token_ids: the chosen chunks' token ids as sampled (final end-of-turn included).
        steps: one dict per step: ``candidates`` (texts), ``scores`` (floats, ``None`` when
            nothing was scored), ``chosen`` (index or ``None``), ``n_tokens`` (sampled tokens per
            candidate), ``finish`` (why each candidate stopped: ``boundary``, ``eos``,
            ``step_cap``, ``budget``) and ``attempts`` (samples drawn, retries included).
        policy_tokens: tokens forwarded through the policy, prefill included.
        rm_tokens: tokens forwarded through the reward model.
        wall_s: wall-clock seconds of the whole decode.
        stop_reason: ``eos``, ``max_new_tokens``, ``max_steps`` or ``no_candidates``.
    """

    text: str
    token_ids: list[int]
    steps: list[dict[str, Any]] = field(default_factory=list)
    policy_tokens: int = 0
    rm_tokens: int = 0
    wall_s: float = 0.0
    stop_reason: str = ""


@dataclass
class _Candidate:
    """One sampled chunk with the cache copy and next-token logits it ended with."""

    ids: list[int]
    text: str
    finish: str
    cache: Any
    logits: torch.Tensor
    forwarded: int


def sample_token(
    logits: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = 1.0,
) -> int:
    """Sample one token id from ``logits`` (shape ``[1, vocab]``) the reference's way.

    Softmax at ``temperature``, then top-k on the probabilities (renormalised), then top-p
    when ``0 < top_p < 1``, then ``torch.multinomial``. ``temperature <= 0`` is argmax.
    """
    if temperature <= 0:
        return int(torch.argmax(logits, dim=-1))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is not None and top_k > 0:
        values, index = torch.topk(probs, k=min(top_k, probs.shape[-1]), dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, index, values)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        drop = torch.cumsum(sorted_probs, dim=-1) > top_p
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return int(torch.multinomial(probs[0], num_samples=1, generator=generator))


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _output_cache(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers 5, else ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def prefill(policy_model: Any, prompt_ids: list[int]) -> tuple[Any, torch.Tensor]:
    """Forward the prompt once; return its cache and the logits at the last position."""
    x = torch.tensor([prompt_ids], device=_model_device(policy_model))
    out = policy_model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    return _output_cache(out), out.logits[:, -1, :]


def _forward_one(policy_model: Any, token: int, cache: Any) -> tuple[Any, torch.Tensor]:
    """Forward a single token through ``cache`` (mutated in place); return cache and logits."""
    x = torch.tensor([[token]], device=_model_device(policy_model))
    out = policy_model(input_ids=x, cache=cache, use_cache=True)
    return _output_cache(out), out.logits[:, -1, :]


@dataclass(frozen=True)
class _SampleSpec:
    """Everything a candidate's sampling loop needs besides the starting state."""

    generator: torch.Generator
    eot_ids: frozenset[int]
    boundary: Callable[[str, int], bool]  # (chunk text, chunk tokens) -> the step ends
    temperature: float
    top_k: int | None
    top_p: float | None
    step_cap: int


def sample_candidate(
    policy_model: Any,
    policy_tokenizer: Any,
    start_cache: Any,
    start_logits: torch.Tensor,
    budget_left: int,
    spec: _SampleSpec,
) -> _Candidate:
    """Sample one chunk at batch 1 from a deep copy of ``start_cache``.

    Stops (checked before each sample) at the per-step cap or the remaining budget, after an
    end-of-turn token (which is not forwarded), or when the chunk decoded so far ends a step
    per ``spec.boundary`` (tested after forwarding the chunk's last token).
    """
    cache = copy.deepcopy(start_cache)
    logits = start_logits
    ids: list[int] = []
    forwarded = 0
    while True:
        if len(ids) >= spec.step_cap:
            finish = "step_cap"
            break
        if len(ids) >= budget_left:
            finish = "budget"
            break
        token = sample_token(logits, spec.generator, spec.temperature, spec.top_k, spec.top_p)
        ids.append(token)
        if token in spec.eot_ids:
            finish = "eos"
            break
        cache, logits = _forward_one(policy_model, token, cache)
        forwarded += 1
        text = policy_tokenizer.decode(ids, skip_special_tokens=True)
        if spec.boundary(text, len(ids)):
            finish = "boundary"
            break
    text = policy_tokenizer.decode(ids, skip_special_tokens=True)
    return _Candidate(ids, text, finish, cache, logits, forwarded)


def score_response(
    rm_model: Any, rm_tokenizer: Any, messages: Messages, response: str, score_at: str = "last_token"
) -> tuple[float, int]:
    """Score ``response`` from scratch: full conversation, batch 1, no cache.

    Returns:
        (reward, number of tokens forwarded). The reward is the single-label logit at the
        last token (``score(last_hidden_state[:, -1])``), or the model's own pooled logits when
        it has no ``score`` head.
    """
    ids = conversation_ids(rm_tokenizer, messages, response, score_at)
    x = torch.tensor([ids], device=_model_device(rm_model))
    base = getattr(rm_model, getattr(rm_model, "base_model_prefix", ""), None)
    head = getattr(rm_model, "score", None)
    if base is not None and head is not None:
        hidden = base(input_ids=x, use_cache=False).last_hidden_state[:, -1]
        reward = head(hidden)[0, 0]
    else:
        reward = rm_model(input_ids=x, use_cache=False).logits[0, 0]
    return float(reward), len(ids)


def _collect_candidates(
    n: int, sample: Callable[[], _Candidate]
) -> tuple[list[_Candidate], int, int]:
    """Draw up to ``n`` usable candidates with at most ``3 n`` attempts.

    Empty chunks are dropped and re-sampled unless they ended with end-of-turn (kept, empty).

    Returns:
        (kept candidates, attempts, policy tokens forwarded by all attempts).
    """
    kept: list[_Candidate] = []
    attempts = forwarded = 0
    while len(kept) < n and attempts < ATTEMPTS_PER_CANDIDATE * n:
        attempts += 1
        cand = sample()
        forwarded += cand.forwarded
        if cand.text or cand.finish == "eos":
            kept.append(cand)
    return kept, attempts, forwarded


def _score_candidates(
    rm_model: Any, rm_tokenizer: Any, messages: Messages, accepted: str,
    cands: list[_Candidate], score_at: str,
) -> tuple[list[float], int]:
    """Score ``accepted + chunk`` for each candidate, one full conversation at a time.

    Returns:
        (rewards, reward-model tokens forwarded).
    """
    scores, n_tokens = [], 0
    for cand in cands:
        reward, n = score_response(rm_model, rm_tokenizer, messages, accepted + cand.text, score_at)
        scores.append(reward)
        n_tokens += n
    return scores, n_tokens


def _first_argmax(scores: list[float]) -> int:
    """Index of the first maximal score (the reference's ``max(range(n), key=...)``)."""
    return max(range(len(scores)), key=lambda i: scores[i])


def _step_record(
    cands: list[_Candidate], scores: list[float] | None, chosen: int | None, attempts: int
) -> dict[str, Any]:
    return {
        "candidates": [c.text for c in cands],
        "scores": scores,
        "chosen": chosen,
        "n_tokens": [len(c.ids) for c in cands],
        "finish": [c.finish for c in cands],
        "attempts": attempts,
    }


def reference_decode(
    policy_model: Any,
    policy_tokenizer: Any,
    rm_model: Any,
    rm_tokenizer: Any,
    prompt: str,
    num_candidates: int = 5,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 50,
    seed: int = 0,
    min_step_tokens: int = 8,
    *,
    top_p: float = 1.0,
    max_step_tokens: int = REFERENCE_MAX_STEP_TOKENS,
    max_steps: int = REFERENCE_MAX_STEPS,
    score_at: str = "last_token",
) -> ReferenceResult:
    """Decode ``prompt`` with the reference's best-of-N step loop (see the module docstring).

    Args:
        policy_model / policy_tokenizer: the causal LM and its tokenizer.
        rm_model / rm_tokenizer: a sequence-classification reward model (``num_labels=1``).
        prompt: the user message.
        num_candidates: candidates per step (``N``); with 1 the reward model is not called.
        max_new_tokens: response token budget (the reference's ``max_total_tokens``).
        temperature, top_k, top_p: sampling parameters (reference: 1.0, 50, 1.0).
        seed: seed of the sampling generator.
        min_step_tokens: minimum tokens before a sentence boundary may end a step.
        max_step_tokens: per-step cap (the reference's ``max_tokens_per_sentence``).
        max_steps: cap on non-empty chunks (the reference's ``max_sentences``).
        score_at: where the reward model reads the conversation (:mod:`mahalo.chat`): the
            paper's ``last_token``, or ``end_of_turn`` to match a reward model trained there.
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    start = time.perf_counter()
    messages: Messages = [{"role": "user", "content": prompt}]
    result = ReferenceResult(text="", token_ids=[])
    with torch.inference_mode():
        prompt_ids = generation_prompt_ids(policy_tokenizer, messages)
        cache, logits = prefill(policy_model, prompt_ids)
        result.policy_tokens = len(prompt_ids)
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(seed)
        spec = _SampleSpec(
            generator=generator,
            eot_ids=stop_token_ids(policy_model, policy_tokenizer),
            boundary=PaperBoundary(min_tokens=min_step_tokens),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            step_cap=max_step_tokens,
        )
        result.stop_reason = _step_loop(
            policy_model, policy_tokenizer, rm_model, rm_tokenizer, messages,
            num_candidates, max_new_tokens, max_steps, spec, cache, logits, result, score_at,
        )
    result.wall_s = time.perf_counter() - start
    logger.info(
        "reference decode: %d steps, %d response tokens, policy %d / rm %d tokens, %.2fs (%s)",
        len(result.steps), len(result.token_ids), result.policy_tokens, result.rm_tokens,
        result.wall_s, result.stop_reason,
    )
    return result


def _step_loop(
    policy_model: Any,
    policy_tokenizer: Any,
    rm_model: Any,
    rm_tokenizer: Any,
    messages: Messages,
    num_candidates: int,
    max_new_tokens: int,
    max_steps: int,
    spec: _SampleSpec,
    cache: Any,
    logits: torch.Tensor,
    result: ReferenceResult,
    score_at: str,
) -> str:
    """Run steps until a stop condition; fill ``result`` and return the stop reason."""
    chunks = 0
    while True:
        if len(result.token_ids) >= max_new_tokens:
            return "max_new_tokens"
        if chunks >= max_steps:
            return "max_steps"
        budget_left = max_new_tokens - len(result.token_ids)
        cands, attempts, forwarded = _collect_candidates(
            num_candidates,
            functools.partial(
                sample_candidate,
                policy_model, policy_tokenizer, cache, logits, budget_left, spec,
            ),
        )
        result.policy_tokens += forwarded
        if not cands:
            result.steps.append(_step_record(cands, None, None, attempts))
            return "no_candidates"
        if all(not c.text for c in cands):
            result.steps.append(_step_record(cands, None, None, attempts))
            return "eos"
        if num_candidates == 1:
            scores, best = [math.nan], 0
        else:
            scores, rm_tokens = _score_candidates(
                rm_model, rm_tokenizer, messages, result.text, cands, score_at
            )
            result.rm_tokens += rm_tokens
            best = _first_argmax(scores)
        result.steps.append(_step_record(cands, scores, best, attempts))
        winner = cands[best]
        logger.debug("step %d: chose %d (%s) %r", len(result.steps) - 1, best, winner.finish,
                     winner.text)
        result.token_ids.extend(winner.ids)
        if winner.text:
            result.text += winner.text
            chunks += 1
        if winner.finish == "eos":
            return "eos"
        cache, logits = winner.cache, winner.logits
        cands.clear()  # free the losers' cache copies before the next step, as the reference does
