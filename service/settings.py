"""Service settings (environment prefix ZOSERVE_), built in the app factory: no import-time singleton."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZOSERVE_", env_file=None)

    host: str = "127.0.0.1"
    port: int = 8000
    # A local model directory; empty means the tiny model below, built locally on first run and cached.
    model: str = ""
    tiny_model: str = "tiny-opt"
    served_model_name: str = "base"
    dtype: str = "float32"
    num_slots: int = Field(8, ge=2, le=64)
    max_lora_rank: int = Field(8, ge=1, le=256)
    target_modules: list[str] = ["q_proj", "v_proj"]
    kv_cache_gib: float = 1.0
    max_model_len: int = 512
    data_dir: Path = Path(".zoserve")
    redis_url: str | None = None
    admin_api_keys: list[str] = []
    inference_api_keys: list[str] = []
