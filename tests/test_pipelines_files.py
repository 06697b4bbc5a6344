"""Scheduling examples in pipelines/: every command they run parses with the real CLI options,
the systemd units and calendars are valid, the Airflow DAG imports (when Airflow is installed),
and the runbook documents exit codes and rollback."""
from __future__ import annotations

import ast
import configparser
import os
import py_compile
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pipelines.retrain import retrain_command

REPO = Path(__file__).resolve().parents[1]
PIPE = REPO / "pipelines"
SHELL_OPS = {"&&", "||", ";", "|", ">", ">>", "2>&1", "<"}
UNITS = ("anomaly-vae-retrain.service", "anomaly-vae-retrain.timer",
         "anomaly-vae-score.service", "anomaly-vae-score.timer")


def cli_argv(command: str) -> list[str]:
    """Arguments of the `anomaly-vae` call inside a shell command line (follows `bash -c '...'`)."""
    tokens = shlex.split(command)
    if tokens and tokens[0].endswith("bash") and "-c" in tokens:
        return cli_argv(tokens[tokens.index("-c") + 1])
    starts = [i for i, t in enumerate(tokens) if os.path.basename(t) == "anomaly-vae"
              and (i == 0 or tokens[i - 1] in SHELL_OPS | {"exec"})]       # in command position
    assert starts, f"no anomaly-vae call in {command!r}"
    argv = []
    for t in tokens[starts[0] + 1:]:
        if t in SHELL_OPS:
            break
        argv.append(t)
    return argv


def check_cli_call(argv: list[str]) -> str:
    """Parse argv with the real commands (group options, then the subcommand); returns its name.

    Unknown options, missing required arguments or badly typed values raise click errors.
    """
    from anomaly_vae.cli import main

    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in ("--tracking-uri", "--threads") else 1
    group_opts, name, rest = argv[:i], argv[i], argv[i + 1:]
    main.make_context("anomaly-vae", [*group_opts, name], resilient_parsing=False)
    command = main.commands.get(name) or {"retrain": retrain_command}.get(name)
    assert command is not None, f"anomaly-vae has no command {name!r}"
    sub_name, args = name, list(rest)
    while isinstance(command, click.Group):                 # e.g. models -> promote
        sub_name, args = args[0], args[1:]
        command = command.commands.get(sub_name)
        assert command is not None, f"anomaly-vae {name} has no command {sub_name!r}"
    command.make_context(sub_name, args)
    return name


def cron_entries() -> list[tuple[list[str], str]]:
    entries = []
    for line in (PIPE / "crontab.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"cron line needs 5 time fields and a command: {line!r}"
        entries.append((fields[:5], fields[5]))
    return entries


def test_crontab_lines_are_valid_and_call_real_commands():
    entries = cron_entries()
    assert len(entries) == 2
    names = set()
    for timing, command in entries:
        for field, (lo, hi) in zip(timing, [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]):
            if field != "*":
                assert lo <= int(field) <= hi, f"cron field {field!r} out of range"
        assert "%" not in command.replace("\\%", ""), "cron turns a bare % into a newline; escape it"
        names.add(check_cli_call(cli_argv(command.replace("\\%", "%"))))
    assert names == {"score", "retrain"}


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    cp.optionxform = str
    cp.read(PIPE / name)
    return cp


def test_systemd_units_have_the_right_shape_and_commands():
    for svc in ("anomaly-vae-retrain.service", "anomaly-vae-score.service"):
        s = unit(svc)["Service"]
        assert s["Type"] == "oneshot" and s["WorkingDirectory"].startswith("/")
        exec_start = s["ExecStart"].replace("$$", "$").replace("%%", "%")
        assert check_cli_call(cli_argv(exec_start)) in svc
        timer = unit(svc.replace(".service", ".timer"))
        assert timer["Timer"]["Unit"] == svc and timer["Timer"]["Persistent"] == "true"
        assert timer["Install"]["WantedBy"] == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_calendars_and_units_verify(tmp_path):
    for name in ("anomaly-vae-retrain.timer", "anomaly-vae-score.timer"):
        spec = unit(name)["Timer"]["OnCalendar"]
        out = subprocess.run(["systemd-analyze", "calendar", spec], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    # verify needs the ExecStart binaries to exist: point them at /bin/echo in a copy
    for name in UNITS:
        text = (PIPE / name).read_text().replace("/srv/anomaly-vae/.venv/bin/anomaly-vae", "/bin/echo")
        (tmp_path / name).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in UNITS]],
                         capture_output=True, text=True, cwd=tmp_path)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 0 and not problems, problems


def test_airflow_dag_file_compiles_and_defines_both_dags(tmp_path):
    path = PIPE / "airflow_dag.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "dag.pyc"), doraise=True)
    ids = {kw.value.value for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Call) for kw in node.keywords
           if kw.arg == "dag_id" and isinstance(kw.value, ast.Constant)}
    assert ids == {"anomaly_vae_nightly_score", "anomaly_vae_weekly_retrain"}


def test_airflow_dag_imports():
    pytest.importorskip("airflow", reason="Airflow is an optional extra (pip install -e '.[airflow]'); "
                                          "the DAG file is import-tested only when it is installed")
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(PIPE / "airflow_dag.py"), include_examples=False)
    assert not bag.import_errors, bag.import_errors
    assert set(bag.dag_ids) == {"anomaly_vae_nightly_score", "anomaly_vae_weekly_retrain"}
    retrain = bag.get_dag("anomaly_vae_weekly_retrain").get_task("retrain")
    assert "retrain" in retrain.bash_command and "--end-date" in retrain.bash_command
    assert bag.get_dag("anomaly_vae_nightly_score").get_task("score_partition")


def test_readme_documents_exit_codes_rollback_and_linked_files():
    text = (PIPE / "README.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |"):
        assert code in text
    rollback = re.search(r"^anomaly-vae (models promote \S+ \d+ --alias champion)", text, re.M)
    assert rollback, "README must show the rollback command"
    assert check_cli_call(shlex.split(rollback.group(1))) == "models"
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (PIPE / link).exists(), f"README links to missing {link}"


def test_retrain_command_help_and_script_entry_point():
    assert isinstance(retrain_command, click.Command) and retrain_command.name == "retrain"
    out = subprocess.run([sys.executable, str(PIPE / "retrain.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "Exit codes" in out.stdout and "--wait" in out.stdout and "--days" in out.stdout
