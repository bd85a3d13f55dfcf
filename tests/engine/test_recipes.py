"""engine.recipes: independent runs as subprocesses, a few at a time."""

from __future__ import annotations

import sys

from litedetr.engine.recipes import run_in_parallel


def test_runs_in_parallel_return_each_exit_code_and_log_each_output(tmp_path):
    # each command records how many of its siblings are running at its start, then waits for a file
    script = (
        "import pathlib, sys, time\n"
        "root = pathlib.Path(sys.argv[1]); i = sys.argv[2]\n"
        "(root / f'start{i}').touch(); print('running', len(list(root.glob('start*'))) - len(list(root.glob('end*'))))\n"
        "time.sleep(0.5); (root / f'end{i}').touch(); print('run', i); sys.exit(int(i))\n"
    )
    commands = [([sys.executable, "-c", script, str(tmp_path), str(i)], tmp_path / "logs" / f"{i}.log") for i in range(4)]
    assert run_in_parallel(commands, jobs=2) == [0, 1, 2, 3]
    logs = [(tmp_path / "logs" / f"{i}.log").read_text().split("\n") for i in range(4)]
    assert [log[1] for log in logs] == [f"run {i}" for i in range(4)]
    assert max(int(log[0].split()[1]) for log in logs) <= 2  # never more than two at a time
