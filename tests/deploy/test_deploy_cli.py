"""`python -m deploy` as operators run it: a subprocess, JSON output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import cli, registry

from deploy_testkit import ACTOR, add_candidate, fake_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(registry_url, tmp_path) -> dict[str, str]:
    return {"DATABASE_URL": registry_url, "DATA_DIR": str(tmp_path / "var"), "USER": "alice",
            "LOG_LEVEL": "WARNING"}


@pytest.fixture
def deploy_process(env):
    """Run `python -m deploy ARGS` as operators do; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "deploy", *args], cwd=ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=60)
        return done.returncode, done.stdout, done.stderr

    return run


@pytest.fixture
def deploy(env, monkeypatch, capsys):
    """The same command line, in this process (a subprocess costs ~1-2 s of imports here)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def two_models(conn, tmp_path) -> tuple[str, str]:
    """The base serving, and a second model directory registered beside it."""
    base = registry.register_base(conn, fake_model_dir(tmp_path, "Base"), actor=ACTOR)
    other = registry.register_base(conn, fake_model_dir(tmp_path, "Other"), actor=ACTOR)
    return base.id, other.id


def test_list_and_status_as_json(deploy_process, two_models):
    base, other = two_models
    code, out, _ = deploy_process("list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert isinstance(rows, list) and [r["id"] for r in rows][0] == base
    assert {r["id"]: r["status"] for r in rows} == {base: "serving", other: "candidate"}
    assert {"id", "parent_id", "path", "kind", "status", "metrics", "created_at"} <= rows[0].keys()

    code, out, _ = deploy_process("--json", "status")  # options before the command work too
    assert code == 0
    assert json.loads(out)["serving"]["id"] == base


def test_promote_rollback_pin_and_canary(deploy, conn, two_models):
    base, other = two_models
    code, out, _ = deploy("promote", other, "--reason", "better thumbs", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["changed"] and doc["previous_id"] == base
    event = registry.events(conn, other)[0]
    assert (event.action, event.reason) == ("promote", "better thumbs")
    assert event.actor.startswith("alice@")  # the default actor is $USER@hostname

    code, out, _ = deploy("rollback", "--actor", "bob", "--json")
    assert code == 0 and json.loads(out)["checkpoint_id"] == base
    assert registry.events(conn, base)[0].actor == "bob"

    code, out, _ = deploy("canary", other, "25", "--json")
    assert code == 0 and json.loads(out)["state"]["canary_percent"] == 25
    code, out, _ = deploy("canary-report", "--json")
    assert code == 0 and json.loads(out)["decision"] == "continue"

    code, out, _ = deploy("pin", "--reason", "freeze")
    assert code == 0 and "pinned" in out and base in out
    code, out, _ = deploy("status")
    assert code == 0 and base in out and other in out and "25%" in out and "freeze" in out


def test_exit_codes(deploy, deploy_process, conn, two_models):
    base, other = two_models
    code, out, err = deploy_process("promote", "no-such-checkpoint", "--json")
    assert code == 3
    assert json.loads(out)["error"] == "not_found" and "deploy list" in err

    code, _, _ = deploy("reject", other)  # a rejection needs its reason
    assert code == 2
    code, _, _ = deploy("reject", other, "--reason", "repeats itself")
    assert code == 0
    code, out, err = deploy_process("promote", other, "--json")
    assert code == 4 and json.loads(out)["error"] == "rejected" and "repeats itself" in err

    code, _, err = deploy("retire", base)  # the serving one
    assert code == 4 and "rollback" in err
    code, _, _ = deploy("canary", base, "150")
    assert code == 2
    code, _, _ = deploy("frobnicate")
    assert code == 2


def test_register_a_checkpoint_directory(deploy, conn, tmp_path, two_models):
    base, _ = two_models
    path = add_candidate(conn, tmp_path, parent=base, register=False)
    code, out, _ = deploy("register", str(path), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "candidate" and doc["parent_id"] == base and doc["kind"] == "lora"
    code, out, _ = deploy("show", doc["id"])
    assert code == 0 and "register" in out


def test_engine_url_asks_replicas_and_shows_where_they_are(deploy, deploy_process, conn, two_models):
    code, out, _ = deploy("engine-url", "--json")
    assert code == 0 and json.loads(out)["engine_endpoints"] == []

    code, out, _ = deploy_process("engine-url", "http://engine-green:8000", "--reason", "new weights", "--json")
    assert code == 0
    request = json.loads(out)["request"]
    assert (request["url"], request["replica"], request["reason"]) == ("http://engine-green:8000", None, "new weights")
    assert request["actor"].startswith("alice@")
    code, out, _ = deploy("engine-url", "http://engine-blue:8000", "--replica", "web-1:8000", "--actor", "bob")
    assert code == 0 and "web-1:8000" in out and "http://engine-blue:8000" in out

    state = registry.read_state(conn)
    assert state.engine_endpoint("web-1:8000").url == "http://engine-blue:8000"
    assert state.engine_endpoint("web-2:8000").url == "http://engine-green:8000"
    code, out, _ = deploy("engine-url", "--json")
    doc = json.loads(out)
    assert [e["url"] for e in doc["engine_endpoints"]] == ["http://engine-green:8000", "http://engine-blue:8000"]
    assert [e["action"] for e in doc["events"]] == ["switch", "switch"]
    code, out, _ = deploy("engine-url")
    assert code == 0 and "new weights" in out and "bob" in out
    code, out, _ = deploy("status", "--json")
    assert code == 0 and len(json.loads(out)["engine_endpoints"]) == 2
    code, out, _ = deploy("status")
    assert code == 0 and "engine url" in out and "http://engine-green:8000" in out

    code, _, err = deploy("engine-url", "engine-green:8000")  # not a URL: usage, nothing recorded
    assert code == 2 and "http" in err
    code, _, _ = deploy("engine-url", "--replica", "web-1:8000")  # a replica needs the URL
    assert code == 2
    assert len(registry.read_state(conn).engine_endpoints) == 2


def test_unreachable_database_is_exit_1(tmp_path):
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
           "DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "deploy", "status"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "DATABASE_URL" in done.stderr
