"""Evaluation computes, and only computes: statistics, adaptation curves, the example predictions
figures draw, provenance, and the evaluation protocols (the fixed-task meta-test, Lake's runs),
registered side by side in :mod:`metakd_run.evaluation.protocols`.

Nothing here imports the pipeline, training, tracking or the presentation: a protocol returns
its section of ``summary.json`` (and records), and :mod:`metakd_run.presentation` presents them.
"""
