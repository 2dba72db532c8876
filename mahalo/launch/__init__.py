"""Launchers: where a run's prompts are decoded. ``local`` is :func:`mahalo.api.guided_generate_many`
in this process; :mod:`mahalo.launch.ray` runs replicas on a Ray cluster (optional: ``mahalo[ray]``)."""


class Unanswered(RuntimeError):
    """Prompts a launcher could not get answered (their workers died every time); the answers
    already handed back stand, and a re-run of the same command retries the rest."""
