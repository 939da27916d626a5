"""Ray job entry point: `python jobs/tune.py ARGS` runs `sparsegen tune ARGS` (see `sparsegen submit`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir (the repository)
from pipeline.cli import main  # noqa: E402

raise SystemExit(main(["tune", *sys.argv[1:]]))
