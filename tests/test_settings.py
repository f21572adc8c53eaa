"""One settings class, every variable documented: ``refute.settings.Settings`` against README.md
"Configuration", the command line's own variables, and every ``REFUTE_*`` set in ``deploy/``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

from refute.errors import RefuteError
from refute.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEPLOY = REPO / "deploy"
VARIABLE = re.compile(r"\bREFUTE_[A-Z0-9_]+\b")

#: Variables that are options of one command (typer ``envvar=``), not service settings.
CLI_VARIABLES = {"REFUTE_ADMIN_TOKEN", "REFUTE_CHALLENGER_KEY"}


def _fields() -> set[str]:
    return {f"REFUTE_{name.upper()}" for name in Settings.model_fields}


def _configuration_tables() -> dict[str, set[str]]:
    """README "Configuration": the variables in the first column of each table, keyed by the
    table's second column header (``default`` for settings, ``option`` for the CLI's)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Configuration\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert match, "README.md has no Configuration section"
    tables: dict[str, set[str]] = {}
    header: str | None = None
    for line in match.group(1).splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells[1]
            tables[header] = set()
        elif not set(cells[0]) <= {"-", ":"}:
            name = re.fullmatch(r"`(REFUTE_[A-Z0-9_]+)`", cells[0])
            assert name, f"README Configuration row without a `REFUTE_*` name: {line}"
            assert name.group(1) not in tables[header], f"listed twice: {name.group(1)}"
            tables[header].add(name.group(1))
    return tables


def _cli_envvars() -> set[str]:
    from verifier.main import app

    found: set[str] = set()

    def walk(command: Any) -> None:  # a click command (typer vendors its own click)
        for param in command.params:
            envvars = [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
            found.update(envvars)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return found


def test_readme_table_lists_every_setting_and_nothing_else() -> None:
    documented = _configuration_tables()["default"]
    missing, unknown = _fields() - documented, documented - _fields()
    assert not missing, f"settings missing from README: {sorted(missing)}"
    assert not unknown, f"README lists unknown settings: {sorted(unknown)}"


def test_cli_variables_are_the_commands_own_and_documented_apart() -> None:
    assert _cli_envvars() == CLI_VARIABLES
    assert not CLI_VARIABLES & _fields()
    assert _configuration_tables()["option"] == CLI_VARIABLES


def test_readme_names_no_unknown_variable() -> None:
    named = set(VARIABLE.findall(README.read_text(encoding="utf-8")))
    unknown = named - _fields() - CLI_VARIABLES
    assert not unknown, f"README names variables nothing reads: {sorted(unknown)}"


def test_deploy_sets_only_settings() -> None:
    files = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file()]
    assert any(p.name == "compose.yaml" for p in files)
    assert any(p.name == ".env.example" for p in files)
    for path in files:
        named = set(VARIABLE.findall(path.read_text(encoding="utf-8")))
        unknown = named - _fields() - CLI_VARIABLES
        assert not unknown, f"{path.relative_to(REPO)}: {sorted(unknown)} are not settings"


def test_variables_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFUTE_CHAIN_RPC_URL", "http://127.0.0.1:8545")
    monkeypatch.setenv("REFUTE_NODE", "/opt/node/bin/node")
    monkeypatch.setenv("REFUTE_ANVIL", "")
    monkeypatch.setenv("REFUTE_SRS_PATH", "")
    monkeypatch.setenv("REFUTE_LOG_FORMAT", "json")
    monkeypatch.setenv("REFUTE_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.chain_rpc_url == "http://127.0.0.1:8545"
    assert settings.node == Path("/opt/node/bin/node")
    assert settings.anvil is None and settings.srs_path is None  # empty means unset
    assert settings.log_format == "json" and settings.log_level == "DEBUG"
    assert "8545" not in repr(settings)  # the RPC URL may hold an API key
    monkeypatch.setenv("REFUTE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()


def test_get_settings_refuses_a_time_limit_past_the_visibility_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REFUTE_TASK_TIME_LIMIT_S", "60")
    monkeypatch.setenv("REFUTE_VISIBILITY_TIMEOUT_S", "60")
    get_settings.cache_clear()
    try:
        with pytest.raises(RefuteError, match="visibility timeout"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_get_settings_names_a_malformed_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFUTE_LOG_LEVEL", "LOUD")
    get_settings.cache_clear()
    try:
        with pytest.raises(RefuteError, match=r"REFUTE_LOG_LEVEL: .*unknown log level"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_spot_key_bytes() -> None:
    assert Settings(spot_key="ab" * 16).spot_key_bytes() == b"\xab" * 16
    with pytest.raises(RefuteError, match="not set"):
        Settings(spot_key="").spot_key_bytes()
    with pytest.raises(RefuteError, match="hex"):
        Settings(spot_key="zz").spot_key_bytes()


def test_importing_the_worker_reads_no_settings() -> None:
    """The Celery application is built on demand, not at import."""
    import subprocess
    import sys

    code = ("import refute.settings as s, verifier.worker as w; "
            "assert s.get_settings.cache_info().currsize == 0; "
            "assert w.celery_app.cache_info().currsize == 0")
    env = {"REFUTE_TASK_TIME_LIMIT_S": "9", "REFUTE_VISIBILITY_TIMEOUT_S": "1",
           "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)


def test_a_real_chain_needs_its_own_key(tmp_path: Path) -> None:
    """REFUTE_CHAIN_RPC_URL on a non-loopback host without REFUTE_CHAIN_KEY is refused in one
    line (never anvil's public key on a real chain); a local anvil may use the development key."""
    from prover.evm import ANVIL_DEV_KEY
    from refute.errors import Misconfigured
    from verifier.service import chain_from

    remote = Settings(chain_rpc_url="https://rpc.example.invalid", blob_dir=tmp_path / "b")
    with pytest.raises(Misconfigured, match="REFUTE_CHAIN_KEY is not set"):
        chain_from(remote)
    key = "0x" + "11" * 32
    assert chain_from(remote.model_copy(update={"chain_key": key})).private_key == key
    local = Settings(chain_rpc_url="http://127.0.0.1:8545", blob_dir=tmp_path / "b")
    assert chain_from(local).private_key == ANVIL_DEV_KEY
