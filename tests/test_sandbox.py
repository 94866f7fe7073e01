"""The sandbox basics that `prepare` relies on (issue 5 adds the hostile-input suite)."""

from __future__ import annotations

import os

from bayes_llm.rewards.sandbox import Limits, run_python


def test_runs_in_a_fresh_dir_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    result = run_python("import os; print(os.getcwd()); print(sorted(os.environ))")
    assert result.ok
    cwd, env = result.stdout.splitlines()
    assert cwd != os.getcwd() and "bayes-llm-sandbox-" in cwd
    assert "SECRET_TOKEN" not in env


def test_timeout_kills_the_process_group():
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)"
    )
    result = run_python(code, limits=Limits(wall_seconds=1.0))
    assert result.timed_out and not result.ok and result.seconds < 10


def test_output_is_capped():
    result = run_python("print('x' * 10**8)", limits=Limits(output_bytes=1000))
    assert len(result.stdout) <= 1000 and not result.ok
