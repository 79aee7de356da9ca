"""Presentation presents, and only presents: the console table, the figures (drawn from records),
the dashboard entries and the files of a run folder. (Not called ``outputs``: that is the run
folders' name, which .gitignore and the tools leave out.)

Everything here reads what evaluation returned (the summary and the protocols' records); nothing
imports the meta-learners, the data registry or the pipeline, so a figure cannot re-adapt a model
or rebuild a data set behind the evaluation's back.
"""
