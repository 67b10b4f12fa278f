"""Settings from the environment and the key-scope rules (no engine)."""

from __future__ import annotations

import os

import pytest

from service.auth import AuthError, Scope, check_key
from service.settings import Settings


def test_key_lists_from_env_json_or_commas(monkeypatch):
    monkeypatch.setenv("ZOSERVE_ADMIN_API_KEYS", '["a1", "a2"]')
    monkeypatch.setenv("ZOSERVE_INFERENCE_API_KEYS", "i1, i2,")
    monkeypatch.setenv("ZOSERVE_TARGET_MODULES", "q_proj,v_proj,k_proj")
    settings = Settings()
    assert settings.admin_api_keys == ["a1", "a2"]
    assert settings.inference_api_keys == ["i1", "i2"]
    assert settings.target_modules == ["q_proj", "v_proj", "k_proj"]
    assert not settings.is_open


def test_scopes():
    settings = Settings(admin_api_keys=["adm"], inference_api_keys=["inf"])
    check_key(settings, "adm", Scope.ADMIN)
    check_key(settings, "inf", Scope.INFERENCE)
    for key, scope, status in [(None, Scope.ADMIN, 401), ("nope", Scope.INFERENCE, 401),
                               ("inf", Scope.ADMIN, 403), ("adm", Scope.INFERENCE, 403)]:
        with pytest.raises(AuthError) as err:
            check_key(settings, key, scope)
        assert err.value.status_code == status


def test_open_without_keys_and_closed_planes_once_any_key_exists():
    check_key(Settings(), None, Scope.ADMIN)
    only_inference = Settings(inference_api_keys=["inf"])
    with pytest.raises(AuthError) as err:
        check_key(only_inference, None, Scope.ADMIN)
    assert err.value.status_code == 401


def test_batched_scoring_setting_reaches_the_engine_config(monkeypatch, tmp_path):
    from service.app import engine_config

    model = str(tmp_path / "model")
    assert engine_config(Settings(model=model)).batched_scoring is True
    monkeypatch.setenv("ZOSERVE_BATCHED_SCORING", "false")
    config = engine_config(Settings(model=model))
    assert config.batched_scoring is False
    assert "scheduler_cls" in config.engine_kwargs()  # the default step gate still needs zoserve's scheduler


def test_worker_in_engine_core_setting_picks_vllms_in_process_executor(monkeypatch, tmp_path):
    from scheduler.engine.config import IN_PROCESS_EXECUTOR
    from service.app import engine_config

    model = str(tmp_path / "model")
    monkeypatch.setenv("ZOSERVE_WORKER_IN_ENGINE_CORE", "true")
    config = engine_config(Settings(model=model, cpu_threads=1))
    assert config.engine_kwargs()["distributed_executor_backend"] == IN_PROCESS_EXECUTOR
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # restored after the test
    config.apply_process_env()
    assert os.environ["OMP_NUM_THREADS"] == "1"  # read by the engine-core process it spawns

    monkeypatch.setenv("ZOSERVE_WORKER_IN_ENGINE_CORE", "false")
    assert "distributed_executor_backend" not in engine_config(Settings(model=model)).engine_kwargs()
