"""Outputs present, and only present: the console table, the figures (drawn from records), the
dashboard entries and the files of a run folder.

Everything here reads what evaluation returned (the summary and the protocols' records); nothing
imports the meta-learners, the data registry or the pipeline, so a figure cannot re-adapt a model
or rebuild a data set behind the evaluation's back.
"""
