"""The application around the engine: the command line's config, model loading, prompt files.

Nothing in the engine imports this package. :mod:`~mahalo.app.config` holds the CLI's typed options,
:mod:`~mahalo.app.load` and :mod:`~mahalo.app.registry` build models from paths, GGUF files or
presets, :mod:`~mahalo.app.io` reads prompts and writes JSONL results, :mod:`~mahalo.app.tiny`
builds random models in code for tests and smoke runs.
"""
