"""Deployment files against the code they deploy: Dockerfile, compose files, docs/deploy.md.

Every ``VOXVAULT_*`` name they use is a field of ``Settings``; the shared compose environment
builds valid settings whose URLs the adapters accept; every ``voxvault`` command a container runs
parses with the CLI's own click command; the image installs every extra the package declares;
the docs' tables list every setting (with its default) and every variable the compose files read.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

import voxvault.cli
from voxvault.api.routers.system import router as system_router
from voxvault.blobs import open_blob_store
from voxvault.blobs.s3 import S3BlobStore
from voxvault.events import open_event_bus
from voxvault.jobs import open_job_queue
from voxvault.metadata import open_metadata_store
from voxvault.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
SEAWEEDFS = ROOT / "compose.seaweedfs.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

VOXVAULT_ROLES = ("migrate", "api", "worker")
SETTING_NAMES = {f"VOXVAULT_{name.upper()}" for name in Settings.model_fields}
# What a deployment must choose itself: the stack refuses to start without these.
REQUIRED = {
    "VOXVAULT_SECRET_KEY": "k" * 32,
    "POSTGRES_PASSWORD": "0123abcd0123abcd",
    "S3_SECRET_KEY": "abcd0123abcd0123",
}


# ---- reading compose files as Compose does -------------------------------------------------------


@dataclass(frozen=True)
class Tagged:
    """A value under one of Compose's merge tags, ``!override`` or ``!reset``."""

    tag: str
    value: Any


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML with Compose's merge tags (anchors and ``<<`` merge keys are plain YAML)."""


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    value: Any
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.ScalarNode)
        value = None if node.value in ("", "null", "~") else loader.construct_scalar(node)
    return Tagged(node.tag, value)


for _tag in ("!override", "!reset"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)


def load_yaml(text: str) -> dict[str, Any]:
    loaded = yaml.load(text, Loader=ComposeLoader)
    assert isinstance(loaded, dict)
    return loaded


def load_compose(path: Path) -> dict[str, Any]:
    return load_yaml(path.read_text(encoding="utf-8"))


# Attributes whose value a later file replaces instead of extending (Compose's merge rules).
_REPLACED = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """``override`` merged onto ``base`` by Compose's rules, as far as these files use them."""
    if isinstance(override, Tagged):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, Tagged) and value.tag == "!reset":
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge(merged[name], value, name)
            else:
                merged[name] = value.value if isinstance(value, Tagged) else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED:
        return base + override
    return override


_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


class MissingVariable(Exception):
    pass


@dataclass(frozen=True)
class Interpolation:
    name: str
    op: str | None
    arg: str | None


def interpolations(text: str) -> Iterator[Interpolation]:
    for match in _VARIABLE.finditer(text):
        if match["name"]:
            yield Interpolation(match["name"], match["op"], match["arg"])


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}`` and ``$$`` resolved."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def resolve(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        if op in (":-", ":?"):
            current = current or None
        if current is not None:
            return current
        if op is not None and op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg if op is not None and arg is not None else ""

    return _VARIABLE.sub(resolve, value)


def compose_variables(*paths: Path) -> dict[str, set[str | None]]:
    """Every variable the files interpolate, with the operators it is read with."""
    found: dict[str, set[str | None]] = {}
    for path in paths:
        for item in interpolations(path.read_text(encoding="utf-8")):
            found.setdefault(item.name, set()).add(item.op)
    return found


def active_services(model: Mapping[str, Any]) -> dict[str, Any]:
    """The services ``docker compose up`` starts: those without a profile."""
    services: dict[str, Any] = model["services"]
    return {name: service for name, service in services.items() if not service.get("profiles")}


def published_port(service: Mapping[str, Any], target: int) -> int:
    for entry in service.get("ports", []):
        published, _, container = str(entry).rpartition(":")
        if int(container) == target:
            return int(published)
    raise AssertionError(f"port {target} is not published")


# ---- reading the CLI and the Dockerfile ----------------------------------------------------------


def cli_group() -> Any:
    """The click group typer builds from ``voxvault.cli.app`` (typer may vendor its own click,
    so it is looked at by its attributes: ``commands``, ``params``)."""
    group = typer.main.get_command(voxvault.cli.app)
    assert isinstance(getattr(group, "commands", None), dict)
    return group


def parse_voxvault(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """The subcommand ``argv`` (``voxvault NAME --option value ...``) runs and its parsed options.

    Fails when the command or an option does not exist, or a value does not parse, exactly as the
    CLI itself would refuse it.
    """
    assert argv[:1] == ["voxvault"], argv
    group = cli_group()
    name, *args = argv[1:]
    assert name in group.commands, f"voxvault has no command {name!r}"
    command = group.commands[name]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for token in args:
        if token.startswith("-"):
            assert token.partition("=")[0] in options, f"voxvault {name} has no option {token}"
    context = command.make_context(f"voxvault {name}", list(args))
    return name, dict(context.params)


def cli_envvars() -> set[str]:
    """Environment variables the CLI reads itself (beside the settings)."""
    group = cli_group()
    params = [*group.params]
    for command in group.commands.values():
        params.extend(command.params)
    names: set[str] = set()
    for param in params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages() -> dict[str, Stage]:
    """The Dockerfile's stages in order, continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = Stage(name.strip() or image, image.strip())
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, rest))
    return stages


def stage_instructions(stages: Mapping[str, Stage], name: str) -> tuple[str, list[tuple[str, str]]]:
    """The base image a stage finally rests on, and every instruction from there to the stage."""
    stage = stages[name]
    if stage.parent in stages:
        image, inherited = stage_instructions(stages, stage.parent)
        return image, inherited + stage.instructions
    return stage.parent, list(stage.instructions)


def last(instructions: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for word, rest in instructions if word == keyword]
    assert values, f"no {keyword} instruction"
    return values[-1]


def environment(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def markdown_table(text: str, heading: str) -> dict[str, str]:
    """First cell (code span unwrapped) -> the rest of the row, for the first table under
    ``heading``."""
    section = text.split(heading, 1)[1]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if line.startswith("## ") or (rows and not line.startswith("|")):
            break
        match = re.match(r"\|\s*`([^`]+)`\s*\|(.*)", line)
        if match:
            assert match[1] not in rows, f"{match[1]} is listed twice under {heading!r}"
            rows[match[1]] = match[2]
    return rows


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def seaweedfs_model(compose: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = merge(compose, load_compose(SEAWEEDFS))
    return merged


# ---- the compose stack ---------------------------------------------------------------------------


def test_compose_runs_the_stack_from_the_image_the_dockerfile_builds(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "minio", "minio-setup", *VOXVAULT_ROLES}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["postgres"]["command"] == ["postgres", "-c", "max_connections=300"]
    assert services["redis"]["image"] == "redis:7"
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["minio-setup"]["image"].startswith("minio/mc:")

    images = {services[role]["image"] for role in VOXVAULT_ROLES}
    assert len(images) == 1, images
    for role in VOXVAULT_ROLES:
        build = services[role]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        # One environment for every VoxVault process, from the x-voxvault-environment anchor.
        assert services[role]["environment"] == compose["x-voxvault-environment"]

    # Schema first, then the processes that use it; the bucket exists before anything stores.
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-setup": {"condition": "service_completed_successfully"},
    }
    for role in ("api", "worker"):
        depends = services[role]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
    setup = " ".join(services["minio-setup"]["command"])
    assert "mc mb --ignore-existing" in setup

    # Scalable with --scale worker=N: nothing a second container would collide on.
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    for role in ("migrate", "worker"):
        assert services[role]["healthcheck"] == {"disable": True}


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, SEAWEEDFS)], ids=["minio", "seaweedfs"])
def test_every_dependency_exists_and_can_become_what_is_waited_for(files: tuple[Path, ...]) -> None:
    model: dict[str, Any] = {}
    for path in files:
        model = merge(model, load_compose(path))
    services = active_services(model)
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} waits for {target}, which does not start"
            if rule["condition"] == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test"), (name, target)
                assert not check.get("disable"), (name, target)
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", (name, target)


def test_every_voxvault_command_of_the_stack_exists_in_the_cli(
    compose: dict[str, Any], seaweedfs_model: dict[str, Any]
) -> None:
    assert "/healthz" in {getattr(route, "path", None) for route in system_router.routes}
    for model in (compose, seaweedfs_model):
        services = interpolate(model, REQUIRED)["services"]
        assert parse_voxvault(services["migrate"]["command"]) == ("migrate", {})
        assert parse_voxvault(services["worker"]["command"]) == ("worker", {"concurrency": 1})
        name, api = parse_voxvault(services["api"]["command"])
        assert name == "serve"
        # Reachable from other containers, and no transcription inside the API processes.
        assert api["host"] == "0.0.0.0"
        assert api["workers"] == 0
        health = " ".join(services["api"]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{api['port']}/healthz" in health
        assert published_port(services["api"], api["port"]) == 8000


def test_compose_names_only_real_settings(compose: dict[str, Any]) -> None:
    seaweedfs = load_compose(SEAWEEDFS)
    for model in (compose, seaweedfs):
        for name, service in model["services"].items():
            names = {key for key in service.get("environment", {}) if key.startswith("VOXVAULT_")}
            assert names <= SETTING_NAMES, f"{name}: not settings: {names - SETTING_NAMES}"
    variables = compose_variables(COMPOSE, SEAWEEDFS)
    passed_through = {name for name in variables if name.startswith("VOXVAULT_")}
    assert passed_through <= SETTING_NAMES


def test_secrets_have_no_defaults() -> None:
    variables = compose_variables(COMPOSE, SEAWEEDFS)
    assert {name for name, ops in variables.items() if ":?" in ops} == set(REQUIRED)
    for name, ops in variables.items():
        if re.search("SECRET|PASSWORD", name):
            assert ops == {":?"}, f"{name} is read with {ops}"
    # No bare $NAME: Compose would fill it from the host instead of the container's shell.
    for path in (COMPOSE, SEAWEEDFS):
        lines = path.read_text(encoding="utf-8").splitlines()
        text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
        assert "$" not in re.sub(r"\$\$|\$\{[^}]*\}", "", text), path.name


def test_the_stack_refuses_to_start_without_each_secret(compose: dict[str, Any]) -> None:
    for missing in REQUIRED:
        env = {name: value for name, value in REQUIRED.items() if name != missing}
        with pytest.raises(MissingVariable, match=missing):
            interpolate(compose, env)


@pytest.mark.anyio
@pytest.mark.parametrize("variant", ["minio", "seaweedfs"])
async def test_the_shared_environment_makes_settings_the_adapters_accept(
    variant: str,
    compose: dict[str, Any],
    seaweedfs_model: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = interpolate(compose if variant == "minio" else seaweedfs_model, REQUIRED)
    services = model["services"]
    env = services["api"]["environment"]
    assert {services[role]["environment"] == env for role in VOXVAULT_ROLES} == {True}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()

    assert settings.secret_key is not None
    assert settings.load_secret_key() == REQUIRED["VOXVAULT_SECRET_KEY"].encode()
    # procrastinate's jobs live in the metadata database: no other broker to run.
    assert urlsplit(settings.database_url).scheme == "postgresql"
    assert settings.queue_url == settings.database_url
    assert urlsplit(settings.database_url).hostname == "postgres"

    metadata = open_metadata_store(settings.database_url)
    try:
        queue = open_job_queue(settings.queue_url, metadata, lease_seconds=settings.job_lease_s)
        # Dispatched to workers on any machine, not polled from one process's database.
        assert queue.pushes
    finally:
        await metadata.close()
    events = open_event_bus(settings.events_url)
    await events.close()
    assert urlsplit(settings.events_url).hostname == "redis"

    blobs = open_blob_store(settings.blob_url)
    try:
        assert isinstance(blobs, S3BlobStore)
        endpoint = urlsplit(blobs.endpoint_url)
        assert endpoint.hostname == variant
        store = services[variant]
        # The bucket VoxVault stores into is the one the setup service creates.
        setup = services[f"{variant}-setup"]["environment"]
        assert blobs.bucket == setup["S3_BUCKET"]
        assert setup["S3_ENDPOINT"] == blobs.endpoint_url
        # The keys VoxVault signs with are the ones the store and its setup know.
        keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        assert (setup["S3_ACCESS_KEY"], setup["S3_SECRET_KEY"]) == keys
        if variant == "minio":
            root = store["environment"]
            assert (root["MINIO_ROOT_USER"], root["MINIO_ROOT_PASSWORD"]) == keys
        # Presigned links are signed for the port the object store is published on.
        assert settings.blob_public_url is not None
        public = urlsplit(settings.blob_public_url)
        assert public.port == published_port(store, int(endpoint.port or 80))
        link = await blobs.presigned_url("recordings/r1/original", 60, settings.blob_public_url)
        assert link.startswith(f"{settings.blob_public_url}/{blobs.bucket}/")
    finally:
        await blobs.close()


def test_seaweedfs_override_replaces_minio(seaweedfs_model: dict[str, Any]) -> None:
    services = active_services(seaweedfs_model)
    assert "minio" not in services
    assert "minio-setup" not in services
    seaweedfs = services["seaweedfs"]
    assert seaweedfs["image"].startswith("chrislusf/seaweedfs:")
    assert seaweedfs["command"][0] == "server"
    assert "-s3" in seaweedfs["command"]
    assert "mc mb --ignore-existing" in " ".join(services["seaweedfs-setup"]["command"])
    assert seaweedfs_model["services"]["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "seaweedfs-setup": {"condition": "service_completed_successfully"},
    }

    # The S3 identity SeaweedFS is given is the one VoxVault signs with.
    model = interpolate(seaweedfs_model, REQUIRED)
    identities = json.loads(model["configs"]["seaweedfs-s3"]["content"])["identities"]
    env = model["services"]["worker"]["environment"]
    assert identities[0]["credentials"] == [
        {"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}
    ]
    config_path = f"-s3.config={seaweedfs['configs'][0]['target']}"
    assert config_path in seaweedfs["command"]


# ---- the image -----------------------------------------------------------------------------------


def test_the_image_runs_the_api_unprivileged_with_a_health_check() -> None:
    stages = dockerfile_stages()
    default = list(stages)[-1]
    image, instructions = stage_instructions(stages, default)
    assert image == "python:3.11-slim"

    user = last(instructions, "USER")
    assert user not in ("root", "0")
    assert any(word == "RUN" and "useradd" in rest and user in rest for word, rest in instructions)
    env = environment(instructions)
    assert env["VOXVAULT_DATA_DIR"] == "/data"
    assert "/data" in json.loads(last(instructions, "VOLUME"))

    assert json.loads(last(instructions, "ENTRYPOINT"))[0].endswith("tini")
    name, options = parse_voxvault(json.loads(last(instructions, "CMD")))
    assert name == "serve"
    assert options["host"] == "0.0.0.0"
    assert last(instructions, "EXPOSE") == str(options["port"])

    health = last(instructions, "HEALTHCHECK")
    check = json.loads(health.split(" CMD ", 1)[1])
    assert f"http://127.0.0.1:{options['port']}/healthz" in " ".join(check)


def test_every_stage_sets_only_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    stages = dockerfile_stages()
    assert "gpu" in stages
    for name in stages:
        _, instructions = stage_instructions(stages, name)
        settings_env = {k: v for k, v in environment(instructions).items() if "VOXVAULT_" in k}
        assert set(settings_env) <= SETTING_NAMES, name
        with monkeypatch.context() as patch:
            for variable, value in settings_env.items():
                patch.setenv(variable, value)
            settings = Settings()
        if name == "gpu":
            assert settings.whisper_device == "cuda"
            assert last(instructions, "USER") not in ("root", "0")


def test_the_image_installs_every_backend_extra() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = set(pyproject["project"]["optional-dependencies"]) - {"dev"}
    stages = dockerfile_stages()
    build = stages["build"].instructions
    args = dict(rest.split("=", 1) for word, rest in build if word == "ARG" and "=" in rest)
    installed = set(args["INSTALL_EXTRAS"].split(","))
    assert installed == extras
    assert any('".[${INSTALL_EXTRAS}]"' in rest for word, rest in build if word == "RUN")


# ---- the docs ------------------------------------------------------------------------------------


def _default_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_deploy_doc_lists_every_setting_with_its_default() -> None:
    rows = markdown_table(DEPLOY_DOC.read_text(encoding="utf-8"), "\n## Settings\n")
    assert set(rows) == SETTING_NAMES
    for name, info in Settings.model_fields.items():
        default = _default_text(info.default)
        if default is not None:
            variable = f"VOXVAULT_{name.upper()}"
            cell = rows[variable].split("|")[0]
            assert f"`{default}`" in cell, f"{variable}: the default {default} is not in {cell}"


def test_deploy_doc_lists_every_variable_the_compose_files_read() -> None:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    rows = markdown_table(text, "### Variables read by the compose files")
    assert set(rows) == set(compose_variables(COMPOSE, SEAWEEDFS))
    for name in REQUIRED:
        assert rows[name].split("|")[0].strip() == "required"


def test_deploy_files_name_only_real_settings() -> None:
    known = SETTING_NAMES | cli_envvars()
    for path in (DEPLOY_DOC, COMPOSE, SEAWEEDFS, DOCKERFILE):
        names = set(re.findall(r"\bVOXVAULT_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
        assert names <= known, f"{path.name}: {sorted(names - known)}"


def test_deploy_doc_compose_snippets_apply_to_the_stack(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    snippets = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    assert snippets
    stages = dockerfile_stages()
    for snippet in snippets:
        model = interpolate(merge(compose, load_yaml(snippet)), REQUIRED)
        for name, service in model["services"].items():
            target = service.get("build", {}).get("target")
            assert target is None or target in stages, f"{name}: no Dockerfile stage {target}"
            with monkeypatch.context() as patch:
                for variable, value in service.get("environment", {}).items():
                    patch.setenv(variable, value)
                Settings()


def test_readme_links_the_deploy_doc() -> None:
    assert "docs/deploy.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# ---- Compose itself, when installed --------------------------------------------------------------


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.skip(
        "docker compose is not installed; `docker compose config` only reads the files (no "
        "server is involved), so this check is skipped rather than failed, even under CI"
    )


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, SEAWEEDFS)], ids=["minio", "seaweedfs"])
def test_docker_compose_accepts_the_files(files: tuple[Path, ...], tmp_path: Path) -> None:
    compose_command = _docker_compose()
    options = [arg for path in files for arg in ("-f", str(path))]
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    base = [*compose_command, "--project-directory", str(ROOT), "--env-file", str(env_file)]
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    accepted = subprocess.run(
        [*base, *options, "config", "--quiet"],
        env={**clean, **REQUIRED},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert accepted.returncode == 0, accepted.stderr
    refused = subprocess.run(
        [*base, *options, "config", "--quiet"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0
    assert any(name in refused.stderr for name in REQUIRED), refused.stderr
