"""``valuerank serve``'s one configuration: a config file, then ``VALUERANK_*`` environment
variables, then flags, each overriding the one before; ``--print-config`` shows the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlrm.configs import config_from_tree, config_to_tree
from embeddings.store_registry import store_config_from_dict
from serving.commands import serve
from serving.config import ServeConfig
from serving.revenue.backends import tracker_config_from_dict
from serving.revenue.config import RedisTrackerConfig
from serving.routing.config import DepthConfig, RouterConfig

BACKENDS = {"tracker": tracker_config_from_dict, "item_store": store_config_from_dict}


def _print_config(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str] | None = None,
) -> tuple[int, Any, str]:
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    code = serve.main([*argv, "--print-config"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def test_file_then_environment_then_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "serve.toml"
    config_file.write_text(
        "port = 50999\ngrace_s = 9.0\n"
        '[router]\npolicy = "value_aware"\n'
        "[router.depth]\nepsilon = 0.07\ndepths = [0, 10, 50]\n"
        '[tracker]\ntype = "redis"\nurl = "redis://127.0.0.1:6390/0"\n'
    )
    env = {
        "VALUERANK_EPSILON": "0.05",
        "VALUERANK_GRACE_S": "3",
        "VALUERANK_SHARE_LEARNING": "off",
        "VALUERANK_ADMIN_TOKEN": "s3cret-token-0123456789",
    }
    code, printed, _ = _print_config(
        ["--config", str(config_file), "--port", "50111"], capsys, monkeypatch, env
    )
    assert code == 0
    assert printed["admin_token"] == "***"  # set, and never printed
    assert printed["port"] == 50111  # flag over file
    assert printed["grace_s"] == 3.0  # environment over file
    depth = printed["router"]["depth"]
    assert depth["epsilon"] == 0.05 and depth["depths"] == [0, 10, 50] and depth["share_learning"] is False
    assert printed["router"]["policy"] == "value_aware"  # file over default
    assert printed["tracker"] == {**printed["tracker"], "type": "redis", "url": "redis://127.0.0.1:6390/0"}
    # What was printed is a config file that gives the same configuration back.
    again = config_from_tree(ServeConfig, {**printed, "admin_token": None}, "printed", BACKENDS)
    assert again.port == 50111 and again.router.depth.epsilon == 0.05
    assert isinstance(again.tracker, RedisTrackerConfig)


@pytest.mark.parametrize(
    ("setup", "named"),
    [
        ({"env": {"VALUERANK_BUDGET_SHARE": "lots"}}, "VALUERANK_BUDGET_SHARE"),
        ({"env": {"VALUERANK_REUSE_PORT": "maybe"}}, "VALUERANK_REUSE_PORT"),
        ({"env": {"VALUERANK_POLICY": "round_robin"}}, "round_robin"),
        ({"file": '{"router": {"polcy": "value_aware"}}'}, "polcy"),
        ({"file": '{"port": 70000}'}, "port"),
        ({"file": '{"tracker": {"type": "etcd"}}'}, "etcd"),
        ({"file": '{"port": '}, "Expecting value"),
    ],
)
def test_a_bad_setting_in_any_layer_is_an_error_that_names_it(
    setup: dict[str, Any],
    named: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = []
    if "file" in setup:
        (tmp_path / "serve.json").write_text(setup["file"])
        argv = ["--config", str(tmp_path / "serve.json")]
    code, _, err = _print_config(argv, capsys, monkeypatch, setup.get("env"))
    assert code == 2 and named in err


@settings(max_examples=60, deadline=None)
@given(
    port=st.integers(0, 65535),
    epsilon=st.floats(0.0, 1.0),
    depths=st.lists(st.integers(1, 10_000), min_size=1, max_size=6, unique=True),
    share=st.booleans(),
    redis=st.booleans(),
)
def test_a_config_printed_as_a_tree_reads_back_equal(
    port: int, epsilon: float, depths: list[int], share: bool, redis: bool
) -> None:
    depth = DepthConfig(depths=(0, *sorted(depths)), epsilon=epsilon, share_learning=share)
    config = ServeConfig(
        port=port,
        router=RouterConfig(policy="value_aware", depth=depth),
        tracker=RedisTrackerConfig(url=f"redis://127.0.0.1:{port}/0") if redis else ServeConfig().tracker,
    )
    tree = json.loads(json.dumps(config_to_tree(config)))
    assert config_from_tree(ServeConfig, tree, "printed", BACKENDS) == config
