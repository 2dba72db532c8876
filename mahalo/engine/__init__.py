"""The engine: one step loop (:mod:`~mahalo.engine.controller`) and pure selection rules
(:mod:`~mahalo.engine.strategies`)."""
