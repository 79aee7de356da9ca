"""Hydra config tree, installed as the package metakd_run.configs (Hydra needs this file)."""
