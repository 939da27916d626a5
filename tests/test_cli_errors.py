"""`sparsegen train` answers bad input with one line naming the fix, exit code 2, before training (issue 13)."""

import time

import pytest

from pipeline.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["--data", "/nonexistent/x"], "no dataset at /nonexistent/x"),
    (["--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers at http://127.0.0.1:9"),
    (["--address", "127.0.0.1:9"], "no Ray cluster answers at 127.0.0.1:9"),
    (["--set", "training.batch_size=0", "--set", "langevin.steps=-1"], "training.batch_size"),
])
def test_train_bad_input_is_one_line_exit_2(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = time.monotonic()
    try:
        code = main(["train", "--preset", "tiny", "--max-steps", "1", "--workdir", str(tmp_path), *argv])
    except SystemExit as exit_:  # config mistakes leave through argparse-style exit(2)
        code = exit_.code
    elapsed_s = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and elapsed_s < 15
    if "batch_size" in expected:  # every config mistake of the command, reported together
        assert "langevin.steps" in err
    else:
        assert len(err.strip().splitlines()) == 1, err
