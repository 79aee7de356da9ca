"""Evaluation computes, and only computes: statistics, adaptation curves, the example predictions
figures draw, provenance, and the evaluation protocols (the fixed-task meta-test, Lake's runs),
registered side by side in :mod:`metakd_run.evaluation.protocols`.

Nothing here imports the pipeline, training, tracking or the outputs: a protocol returns its
section of ``summary.json`` (and records for the outputs), and :mod:`metakd_run.outputs` presents them.
"""
