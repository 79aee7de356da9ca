"""Copy a ``train.teacher_cache`` folder's teachers into another under the current names.

Teachers cached before fingerprints are named by a digest that includes the data root's path; the
pipeline still finds them there, but only where the data root is spelled the same. Copied under
the fingerprint's name (no paths in it), e.g. into ``results/teachers``, they are found on any
machine. Give the experiment's overrides (as for the run that cached them) and the seeds:

    python scripts/cache_teachers.py /work/studies/teachers results/teachers 0,1,2,3,4 \\
        experiment=omniglot_5w1s_cpu meta=protonet
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import metakd_run.cli  # noqa: F401 - registers the structured configs
from metakd_run import fingerprint
from metakd_run.config import Stage, to_typed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main(source: Path, target: Path, seeds: list[int], overrides: list[str]) -> int:
    target.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for seed in seeds:
            cfg = to_typed(compose("config", overrides=[*overrides, f"seed={seed}"]))
            digest = fingerprint.digest(fingerprint.stage_settings(cfg, Stage.teacher))
            new = target / f"teacher-seed{seed}-{digest}.pt"
            old = source / f"teacher-seed{seed}-{fingerprint.cache_digest(cfg)}.pt"
            found = next((p for p in (source / new.name, old) if p.is_file()), None)
            if found is None:
                print(f"seed {seed}: no cached teacher in {source}", file=sys.stderr)
                continue
            shutil.copyfile(found, new)
            print(f"seed {seed}: {found} -> {new}")
    return 0


if __name__ == "__main__":
    src, dst, seed_list, *rest = sys.argv[1:]
    sys.exit(main(Path(src), Path(dst), [int(s) for s in seed_list.split(",")], rest))
