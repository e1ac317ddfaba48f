"""Settings: TOML + HAR_EDGE_* variables, unknown keys and bad values refused with clear messages."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from har_edge.agent.errors import ConfigError
from har_edge.agent.settings import load_settings


def test_defaults(tmp_path):
    s = load_settings(env={}, data_dir=tmp_path)
    assert s.data_dir == tmp_path and s.inbox == tmp_path / "inbox"
    assert s.agent.settle_s == 2.0 and s.sync.experiment == "har-edge"


def test_default_data_dir_is_var():
    assert load_settings(env={}).data_dir == Path("var")


def test_env_and_file_layers(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('log_level = "debug"\n[agent]\nsettle_s = 5\nthreads = 2\n')
    s = load_settings(cfg, env={"HAR_EDGE_AGENT__THREADS": "3", "HAR_EDGE_DATA_DIR": str(tmp_path)})
    assert s.log_level == "DEBUG" and s.agent.settle_s == 5 and s.agent.threads == 3 and s.data_dir == tmp_path


def test_config_in_data_dir_is_found(tmp_path):
    (tmp_path / "har-edge.toml").write_text("[sync]\nexperiment = 'study-7'\n")
    assert load_settings(env={"HAR_EDGE_DATA_DIR": str(tmp_path)}).sync.experiment == "study-7"


def test_every_problem_is_listed(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[agent]\nsettle = 5\nthreads = 0\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={"HAR_EDGE_BOGUS": "1"})
    msg = str(err.value)
    assert "agent.settle: unknown setting" in msg
    assert "agent.threads" in msg and "auto or a whole number of threads from 1 to 64" in msg
    assert "bogus: unknown setting" in msg


def test_bad_toml_is_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, env={})


def test_settings_are_frozen(tmp_path):
    s = load_settings(env={}, data_dir=tmp_path)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.agent.threads = 4


def test_secrets_do_not_show_in_repr(tmp_path):
    s = load_settings(env={"HAR_EDGE_SYNC__PASSWORD": "hunter2", "HAR_EDGE_SYNC__TOKEN": "tok-123"}, data_dir=tmp_path)
    assert "hunter2" not in repr(s) and "tok-123" not in repr(s)
