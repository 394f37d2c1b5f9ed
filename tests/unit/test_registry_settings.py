"""Registry of job types, settings and processing modes (no server needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prefect import flow
from pydantic import BaseModel, ConfigDict

from jobbridge.errors import JobValidationError, UnknownJobTypeError
from jobbridge.modes import configure_logging, debug_logger, job_environment
from jobbridge.registry import get_spec, job_type, known_types
from jobbridge.settings import ProcessingMode, Settings


class GreetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    who: str
    times: int = 1


@job_type("greet-test", parameters=GreetParams)
@flow(name="greet-test")
def greet_test(who: str, times: int = 1) -> dict[str, str]:
    """Say hello."""
    return {"greeting": " ".join([f"hello {who}"] * times)}


def test_builtin_and_custom_types_are_known() -> None:
    names = known_types()
    assert {"extract", "compress", "validate", "greet-test"} <= set(names)
    spec = get_spec("greet-test")
    assert spec.flow is greet_test
    assert spec.entrypoint == "tests.unit.test_registry_settings:greet_test" or spec.entrypoint.endswith(
        "test_registry_settings:greet_test"
    )
    assert spec.description == "Say hello."


def test_legacy_type_names_resolve() -> None:
    assert get_spec("file_extraction").name == "extract"
    assert get_spec("DATA_COMPRESSION").name == "compress"


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(UnknownJobTypeError) as info:
        get_spec("transmogrify")
    message = str(info.value)
    assert "transmogrify" in message
    for name in ("extract", "compress", "validate"):
        assert name in message


def test_parameters_are_validated_with_field_names() -> None:
    spec = get_spec("greet-test")
    assert spec.validate_parameters({"who": "ada"}) == {"who": "ada"}
    with pytest.raises(JobValidationError) as info:
        spec.validate_parameters({"times": "many", "colour": "red"})
    message = str(info.value)
    assert "'who' is required" in message
    assert "'times'" in message
    assert "'colour' is not a parameter" in message


def test_registering_something_that_is_not_a_flow_fails() -> None:
    with pytest.raises(TypeError, match="must be a Prefect flow"):
        job_type("bad")(lambda: None)  # type: ignore[type-var]


def test_test_mode_prefixes_every_name() -> None:
    normal = Settings(mode=ProcessingMode.NORMAL)
    test = Settings(mode=ProcessingMode.TEST, test_prefix="qa_")
    assert normal.tag_prefix == "jobbridge" and normal.deployment_name == "jobbridge"
    assert test.tag_prefix == "qa_jobbridge" and test.deployment_name == "qa_jobbridge"
    assert test.namespaced("orders") == "qa_orders"


def test_settings_read_env_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBBRIDGE_MODE", "DEBUG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("JOBBRIDGE_PLUGINS", "a.b, c")
    settings = Settings()
    assert settings.mode is ProcessingMode.DEBUG
    assert settings.plugins == ["a.b", "c"]
    shown = settings.redacted()
    assert shown["aws_secret_access_key"] == "**********"
    assert "very-secret" not in repr(shown)


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBBRIDGE_MODE", "LOUD")
    with pytest.raises(ValueError, match="mode"):
        Settings()


def test_debug_mode_logs_every_step_to_the_debug_file(tmp_path: Path) -> None:
    log_file = tmp_path / "debug.log"
    settings = Settings(mode=ProcessingMode.DEBUG, debug_log_file=log_file)
    assert configure_logging(settings) == log_file.resolve()
    assert configure_logging(settings) == log_file.resolve()  # idempotent
    debug_logger("unit").debug("a debug step")
    for handler in logging.getLogger("jobbridge").handlers:
        handler.flush()
    assert log_file.read_text().count("a debug step") == 1
    assert job_environment(settings)["JOBBRIDGE_DEBUG_LOG_FILE"] == str(log_file.resolve())
    assert configure_logging(Settings(mode=ProcessingMode.NORMAL)) is None


def test_a_new_debug_file_replaces_the_old_one(tmp_path: Path) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    configure_logging(Settings(mode=ProcessingMode.DEBUG, debug_log_file=first))
    configure_logging(Settings(mode=ProcessingMode.DEBUG, debug_log_file=second))
    debug_logger("unit").debug("after the switch")
    for handler in logging.getLogger("jobbridge").handlers:
        handler.flush()
    assert "after the switch" in second.read_text()
    assert "after the switch" not in first.read_text()
