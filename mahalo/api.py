"""The public library entry: :func:`guided_generate` and :func:`guided_generate_many`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mahalo.chat import Messages, as_messages, with_system
from mahalo.config import GuideConfig, config_from_options
from mahalo.engine.build import controller_of
from mahalo.engine.scheduler import schedule
from mahalo.result import GuidedResult

ERRORS = ("raise", "return")


def guided_generate_many(
    policy: Any,
    prms: Mapping[str, Any] | None,
    prompts: Iterable[str | Messages],
    *,
    config: GuideConfig | None = None,
    errors: str = "raise",
    system_prompt: str | None = None,
    **options: Any,
) -> Iterator[tuple[int, GuidedResult]]:
    """Answer many prompts, several in flight at once, guided by the reward models ``prms``.

    Prompts in flight share every policy forward, one token at a time, each moving through its own
    steps; a finished prompt's rows go to the next prompt at the following token. A prompt gets the
    same answer as it would alone: each row samples from its own seeded stream.

    Args:
        policy, prms: as for :func:`guided_generate`.
        prompts: user messages or chat conversations (OpenAI-style ``messages`` lists: system,
            user and assistant turns, ending with a user turn), read lazily.
        config, **options: as for :func:`guided_generate`, plus ``max_prompts`` (prompts in
            flight; 0 picks for the device), ``max_rows`` (the budget of decoding rows; 0 picks
            for the device) and the engine's ``share_prefix``, ``step_barrier``,
            ``prefill_chunk`` and ``compile`` (see :mod:`mahalo.config`).
        errors: ``raise`` (a failing prompt raises its ``ValueError``) or ``return`` (it is
            yielded as ``(index, ValueError)`` and the others go on).
        system_prompt: a system turn put first in every conversation that has none.

    Yields:
        ``(input index, GuidedResult)`` as each prompt finishes (not in input order).

    Raises:
        ValueError: an invalid option or model (before anything is decoded), or a failing prompt
            with ``errors="raise"``.
    """
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {list(ERRORS)}, got {errors!r}")
    cfg = config_from_options(config, **options)
    controller = controller_of(policy, prms, cfg)
    if system_prompt is not None and not (isinstance(system_prompt, str) and system_prompt.strip()):
        raise ValueError("system_prompt must be a non-empty string (or None)")
    for index, out in schedule(controller, _with_system(prompts, system_prompt), cfg.batch.max_prompts,
                               cfg.batch.max_rows):
        if isinstance(out, ValueError) and errors == "raise":
            raise out
        yield index, out


def _with_system(prompts: Iterable[str | Messages], system_prompt: str | None) -> Iterator[str | Messages]:
    """Each prompt as a conversation with the system turn; a malformed one is passed on as it is,
    for the scheduler to report as that prompt's error."""
    for prompt in prompts:
        try:
            yield with_system(as_messages(prompt), system_prompt)
        except ValueError:
            yield prompt


def guided_generate(
    policy: Any,
    prms: Mapping[str, Any] | None,
    prompt: str | Messages,
    *,
    config: GuideConfig | None = None,
    system_prompt: str | None = None,
    **options: Any,
) -> GuidedResult:
    """Answer ``prompt`` with ``policy``, guided step by step by the reward models ``prms``.

    Args:
        policy: a :class:`mahalo.policy.Policy` or a ``(causal LM, tokenizer)`` pair.
        prms: objective name -> reward model: a :class:`mahalo.rewards.RewardModel`, a
            ``(sequence-classification model, tokenizer)`` pair, or a callable
            ``(prompt, response) -> float``. Empty or None: unguided decoding.
        prompt: a user message, or a conversation (a list of ``{"role", "content"}`` turns:
            an optional first ``system`` turn, then ``user`` and ``assistant`` turns ending with
            the user's); the policy's chat template is applied, and reward models read the whole
            conversation as their own chat template renders it.
        system_prompt: a system turn put first when ``prompt`` has none.
        config: a base :class:`GuideConfig` (defaults: MAHALO's step best-of-5); ``options``
            override its fields.
        **options: ``strategy``, ``num_candidates``, ``beam_width``, ``weights``, ``normalize``,
            ``temperature``, ``top_k``, ``top_p``, ``stop_token_ids``, ``stop``, ``step``,
            ``min_step_tokens``, ``max_step_tokens``, ``max_new_tokens``, ``seed``, ``dedupe``,
            ``length_penalty`` (see :mod:`mahalo.config`).

    Returns:
        a :class:`GuidedResult`: the text, every step's candidates and scores, and the cost.

    Raises:
        ValueError: an invalid option, prompt, model or weight; the message says which.
    """
    ((_, result),) = guided_generate_many(policy, prms, [prompt], config=config, system_prompt=system_prompt,
                                          **options)
    return result
