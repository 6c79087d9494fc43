"""Config loading: defaults, file, environment, precedence and one-line errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from appliance.config import (
    AppConfig,
    ConfigError,
    StoreConfig,
    ZmqConfig,
    build_config,
    env_overrides,
    load_config,
    read_toml,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_toml_equals_builtin_defaults() -> None:
    shipped = build_config(read_toml(REPO_ROOT / "Config.toml"), environ={})
    assert shipped == AppConfig()


def _leaf_keys(struct: msgspec.Struct, prefix: str = "") -> set[str]:
    keys = set()
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if isinstance(value, msgspec.Struct):
            keys |= _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _toml_keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in table.items():
        if isinstance(value, dict):
            keys |= _toml_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_shipped_config_toml_sets_every_key_explicitly() -> None:
    data = read_toml(REPO_ROOT / "Config.toml")
    expected = _leaf_keys(AppConfig())
    assert {"transport.zmq.router_endpoint", "transport.shm.slots", "transport.rdma.enabled"} <= (
        expected
    )
    assert _toml_keys(data) == expected


def test_every_shipped_key_is_commented() -> None:
    lines = (REPO_ROOT / "Config.toml").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[number - 1].startswith("#"), f"Config.toml:{number + 1}: {line}"


def test_spec_defaults() -> None:
    config = AppConfig()
    assert (config.server.host, config.server.port, config.log.level) == ("127.0.0.1", 8080, "info")
    assert config.store == StoreConfig(
        max_data_retention=150_000_000,
        cleanup_keep_count=100_000_000,
        max_symbols=10,
        starting_capacity=1_000_000,
        max_batch_size=1_000_000,
    )
    assert config.log.access_log is False
    assert config.log.file == "logs/app.log"
    assert config.engine.backend == "auto"


def test_without_file_or_env_the_defaults_apply(tmp_path: Path) -> None:
    assert load_config(None, environ={}, cwd=tmp_path) == AppConfig()


def test_config_toml_in_cwd_is_read(tmp_path: Path) -> None:
    (tmp_path / "Config.toml").write_text("[server]\nport = 9000\n")
    assert load_config(None, environ={}, cwd=tmp_path).server.port == 9000


def test_explicit_path_beats_cwd_file(tmp_path: Path) -> None:
    (tmp_path / "Config.toml").write_text("[server]\nport = 9000\n")
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 9001\n")
    assert load_config(other, environ={}, cwd=tmp_path).server.port == 9001


def test_env_beats_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9000\n[store]\nmax_symbols = 5\n")
    config = load_config(path, environ={"APP_SERVER__PORT": "9090"})
    assert config.server.port == 9090
    assert config.store.max_symbols == 5


@pytest.mark.parametrize(
    "name", ["APP_STORE__MAX_SYMBOLS", "app_store__max_symbols", "App_Store__Max_Symbols"]
)
def test_env_names_are_case_insensitive(name: str) -> None:
    assert build_config({}, {name: "20"}).store.max_symbols == 20


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0.0.0.0", "0.0.0.0"), ('"::1"', "::1"), ("localhost", "localhost")],
)
def test_env_values_are_toml_literals_else_strings(raw: str, expected: str) -> None:
    assert build_config({}, {"APP_SERVER__HOST": raw}).server.host == expected


def test_env_value_types() -> None:
    config = build_config(
        {},
        {
            "APP_LOG__ACCESS_LOG": "true",
            "APP_SERVER__GRACEFUL_SHUTDOWN_S": "2.5",
            "APP_STORE__MAX_BATCH_SIZE": "1_000",
            "APP_LOG__FILE": "",
            "APP_ENGINE__BACKEND": "cpu",
        },
    )
    assert config.log.access_log is True
    assert config.server.graceful_shutdown_s == 2.5
    assert config.store.max_batch_size == 1000
    assert config.log.file == ""
    assert config.engine.backend == "cpu"


def test_unrelated_app_variables_are_ignored() -> None:
    assert env_overrides({"APP_HOME": "/x", "PATH": "/bin"}) == {}
    assert build_config({}, {"APP_HOME": "/x"}) == AppConfig()


@pytest.mark.parametrize(
    ("file_data", "env", "key"),
    [
        ({}, {"APP_STORE__MAX_SYMBOLS": "0"}, "store.max_symbols"),
        ({}, {"APP_STORE__MAX_SYMBOLS": "ten"}, "store.max_symbols"),
        ({}, {"APP_STORE__MAX_SYMBOLS": "1.5"}, "store.max_symbols"),
        ({}, {"APP_SERVER__PORT": "0"}, "server.port"),
        ({}, {"APP_SERVER__PORT": "65536"}, "server.port"),
        ({}, {"APP_SERVER__HOST": '""'}, "server.host"),
        ({}, {"APP_SERVER__GRACEFUL_SHUTDOWN_S": "0"}, "server.graceful_shutdown_s"),
        ({}, {"APP_SERVER__MAX_BODY_BYTES": "-1"}, "server.max_body_bytes"),
        ({}, {"APP_LOG__LEVEL": "LOUD"}, "log.level"),
        ({}, {"APP_LOG__ACCESS_LOG": "yes"}, "log.access_log"),
        ({}, {"APP_ENGINE__BACKEND": "tpu"}, "engine.backend"),
        ({}, {"APP_ENGINE__GPU_HISTORY_MIN_VALUES": "0"}, "engine.gpu_history_min_values"),
        ({}, {"APP_STORE__TYPO": "1"}, "store.typo"),
        ({}, {"APP_NOSECTION__KEY": "1"}, "nosection"),
        ({}, {"APP_STORE__CLEANUP_KEEP_COUNT": "200000000"}, "store.cleanup_keep_count"),
        ({"store": {"max_symbols": True}}, {}, "store.max_symbols"),
        ({"store": {"max_data_retention": 10}}, {}, "store.cleanup_keep_count"),
        ({"store": 3}, {}, "store"),
        ({"extra": {"x": 1}}, {}, "extra"),
    ],
)
def test_bad_values_raise_one_line_config_error_naming_the_key(
    file_data: dict, env: dict, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(file_data, env)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key), message


def test_error_names_the_environment_variable_it_came_from() -> None:
    with pytest.raises(ConfigError, match="APP_STORE__MAX_SYMBOLS"):
        build_config({}, {"APP_STORE__MAX_SYMBOLS": "0"})


def test_unknown_nested_env_key_names_the_key_and_variable() -> None:
    with pytest.raises(ConfigError, match=r"^store\.a \(from APP_STORE__A__B\): unknown key"):
        build_config({}, {"APP_STORE__A__B": "1"})


def test_missing_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[store\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML"):
        load_config(broken, environ={})


def test_config_is_frozen() -> None:
    config = AppConfig()
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_max_body_bytes_is_derived_unless_explicit() -> None:
    derived = build_config({}, {"APP_STORE__MAX_BATCH_SIZE": "1000"})
    assert derived.max_body_bytes == 48 * 1000 + 64 * 1024
    explicit = build_config({}, {"APP_SERVER__MAX_BODY_BYTES": "5000"})
    assert explicit.max_body_bytes == 5000


def test_env_value_must_be_a_single_toml_literal() -> None:
    with pytest.raises(ConfigError, match=r"^server\.port"):
        build_config({}, {"APP_SERVER__PORT": "9090\nhost = 'x'"})


@pytest.mark.parametrize(
    ("name", "raw", "get"),
    [
        ("APP_LOG__FILE", "123", lambda c: c.log.file),
        ("APP_SERVER__HOST", "1", lambda c: c.server.host),
        ("APP_LOG__FILE", "1.5", lambda c: c.log.file),
        ("APP_LOG__FILE", "true", lambda c: c.log.file),
    ],
)
def test_text_keys_take_the_raw_string_even_if_it_looks_like_a_number(
    name: str, raw: str, get
) -> None:
    assert get(build_config({}, {name: raw})) == raw


@pytest.mark.parametrize(
    ("file_data", "env"),
    [
        ({}, {"APP_LOG__LEVEL": "INFO", "APP_ENGINE__BACKEND": "CPU"}),
        ({"log": {"level": "Info"}, "engine": {"backend": "cPu"}}, {}),
    ],
)
def test_enum_values_are_case_insensitive_in_file_and_env(file_data: dict, env: dict) -> None:
    config = build_config(file_data, env)
    assert (config.log.level, config.engine.backend) == ("info", "cpu")


def test_unknown_section_from_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^foo \(from APP_FOO__BAR\): unknown key"):
        build_config({}, {"APP_FOO__BAR": "1"})


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[server]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not UTF-8") as info:
        load_config(bad, environ={})
    assert "\n" not in str(info.value)


# --- [transport.*] ----------------------------------------------------------------------------


def test_transport_defaults_follow_the_spec() -> None:
    transport = AppConfig().transport
    assert transport.zmq == ZmqConfig(
        enabled=True,
        router_endpoint="tcp://127.0.0.1:5555",
        pull_endpoint="tcp://127.0.0.1:5556",
        control_endpoint="tcp://127.0.0.1:5557",
        sub_connect=(),
    )
    assert transport.shm.enabled is True
    assert transport.rdma.enabled is False


def test_env_overrides_nest_one_table_per_double_underscore() -> None:
    assert env_overrides(
        {
            "APP_TRANSPORT__ZMQ__ENABLED": "false",
            "app_transport__shm__slots": "2048",
            "APP_SERVER__PORT": "9090",
        }
    ) == {
        ("transport", "zmq", "enabled"): ("APP_TRANSPORT__ZMQ__ENABLED", False),
        ("transport", "shm", "slots"): ("app_transport__shm__slots", 2048),
        ("server", "port"): ("APP_SERVER__PORT", 9090),
    }


def test_three_level_env_overrides() -> None:
    config = build_config(
        {"transport": {"zmq": {"rcvhwm": 5}}},
        {
            "APP_TRANSPORT__ZMQ__ENABLED": "false",
            "APP_TRANSPORT__SHM__ENABLED": "false",
            "APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": "ipc:///tmp/hft-router",
            "APP_TRANSPORT__ZMQ__PULL_ENDPOINT": "",
            "APP_TRANSPORT__ZMQ__SUB_CONNECT": '["tcp://feed-a:6000", "tcp://feed-b:6000"]',
            "APP_TRANSPORT__SHM__SLOTS": "4096",
            "APP_TRANSPORT__SHM__SPIN_US": "0",
            "APP_TRANSPORT__RDMA__ENABLED": "true",
        },
    )
    zmq, shm = config.transport.zmq, config.transport.shm
    assert (zmq.enabled, zmq.router_endpoint, zmq.pull_endpoint) == (
        False, "ipc:///tmp/hft-router", "",
    )  # fmt: skip
    assert zmq.sub_connect == ("tcp://feed-a:6000", "tcp://feed-b:6000")
    assert zmq.rcvhwm == 5  # the file's value, not overridden
    assert (shm.enabled, shm.slots, shm.spin_us) == (False, 4096, 0)
    assert config.transport.rdma.enabled is True


@pytest.mark.parametrize(("raw", "expected"), [("required", "required"), ("false", False)])
def test_rdma_enabled_takes_a_bool_or_required(raw: str, expected: object) -> None:
    config = build_config({}, {"APP_TRANSPORT__RDMA__ENABLED": raw})
    assert config.transport.rdma.enabled == expected
    from_file = build_config({"transport": {"rdma": {"enabled": expected}}}, {})
    assert from_file.transport.rdma.enabled == expected


def test_env_beats_file_in_nested_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[transport.zmq]\nrouter_endpoint = "tcp://0.0.0.0:7000"\n')
    assert load_config(path, environ={}).transport.zmq.router_endpoint == "tcp://0.0.0.0:7000"
    config = load_config(
        path, environ={"APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": "tcp://127.0.0.1:7001"}
    )
    assert config.transport.zmq.router_endpoint == "tcp://127.0.0.1:7001"


def test_env_overrides_do_not_mutate_the_file_data() -> None:
    file_data = {"transport": {"zmq": {"rcvhwm": 5}}}
    build_config(file_data, {"APP_TRANSPORT__ZMQ__RCVHWM": "6"})
    assert file_data == {"transport": {"zmq": {"rcvhwm": 5}}}


@pytest.mark.parametrize(
    "name", ["APP_A____B", "APP_TRANSPORT____ENABLED", "APP_TRANSPORT__ZMQ__", "APP___PORT"]
)
def test_an_empty_part_in_an_env_name_is_an_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({}, {name: "1"})
    message = str(info.value)
    assert message.startswith(name) and "\n" not in message


@pytest.mark.parametrize(
    ("file_data", "env", "key"),
    [
        (
            {},
            {"APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": "http://x:1"},
            "transport.zmq.router_endpoint",
        ),
        ({}, {"APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": ""}, "transport.zmq.router_endpoint"),
        ({}, {"APP_TRANSPORT__ZMQ__PULL_ENDPOINT": "inproc://x"}, "transport.zmq.pull_endpoint"),
        ({}, {"APP_TRANSPORT__ZMQ__ENABLED": "maybe"}, "transport.zmq.enabled"),
        ({}, {"APP_TRANSPORT__ZMQ__SUB_CONNECT": "tcp://a:1"}, "transport.zmq.sub_connect"),
        ({}, {"APP_TRANSPORT__ZMQ__SUB_CONNECT": '["udp://a:1"]'}, "transport.zmq.sub_connect"),
        ({}, {"APP_TRANSPORT__ZMQ__RCVHWM": "0"}, "transport.zmq.rcvhwm"),
        ({}, {"APP_TRANSPORT__ZMQ__TYPO": "1"}, "transport.zmq.typo"),
        ({}, {"APP_TRANSPORT__SHM__SLOTS": "1"}, "transport.shm.slots"),
        ({}, {"APP_TRANSPORT__SHM__SLOTS": "1000"}, "transport.shm.slots"),
        ({}, {"APP_TRANSPORT__SHM__SLOTS": "many"}, "transport.shm.slots"),
        ({}, {"APP_TRANSPORT__SHM__MAX_SLOTS": "3000"}, "transport.shm.max_slots"),
        ({}, {"APP_TRANSPORT__SHM__SLOT_BYTES": "100"}, "transport.shm.slot_bytes"),
        ({}, {"APP_TRANSPORT__SHM__SLOT_BYTES": "1000"}, "transport.shm.slot_bytes"),
        ({}, {"APP_TRANSPORT__SHM__SPIN_US": "-1"}, "transport.shm.spin_us"),
        ({}, {"APP_TRANSPORT__RDMA__ENABLED": "maybe"}, "transport.rdma.enabled"),
        ({}, {"APP_TRANSPORT__NOPE__X": "1"}, "transport.nope"),
        ({}, {"APP_TRANSPORT__ZMQ": "1"}, "transport.zmq"),
        ({"transport": {"shm": {"slots": 1 << 20}}}, {}, "transport.shm.slots"),
        ({"transport": {"zmq": []}}, {}, "transport.zmq"),
    ],
)
def test_bad_transport_values_name_the_key(file_data: dict, env: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(file_data, env)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key), message
    for name in env:
        assert name in message


@pytest.mark.parametrize(
    "env",
    [
        {"APP_TRANSPORT__ZMQ__ENABLED": "false"},
        {"APP_TRANSPORT__ZMQ__CONTROL_ENDPOINT": ""},
    ],
)
def test_shm_is_inactive_without_the_zmq_control_socket(env: dict) -> None:
    config = build_config({}, env)
    assert config.transport.shm.enabled is True
    assert config.transport.shm_active is False
    assert build_config({}, {}).transport.shm_active is True


def test_the_largest_default_ring_must_fit_the_maximum() -> None:
    with pytest.raises(ConfigError, match=r"^transport\.shm\.slots / slot_bytes"):
        build_config({}, {"APP_TRANSPORT__SHM__SLOT_BYTES": str(1 << 21)})
    config = build_config(
        {}, {"APP_TRANSPORT__SHM__SLOT_BYTES": str(1 << 21), "APP_TRANSPORT__SHM__MAX_SLOT_BYTES":
             str(1 << 21)},
    )  # fmt: skip
    assert config.transport.shm.slot_bytes == 1 << 21


def test_readme_configuration_table_lists_every_key() -> None:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([a-z_.]+)`", line.split("|")[1])
        table = names[0].rpartition(".")[0]
        documented |= {name if "." in name else f"{table}.{name}" for name in names}
    assert documented == _leaf_keys(AppConfig())


def test_file_error_in_transport_shm_does_not_name_an_unrelated_variable() -> None:
    """Regression: an error in the file's [transport.shm] said "(from APP_TRANSPORT__ZMQ__ENABLED)":
    any variable under [transport] became the origin of every check on that section."""
    file_data = {"transport": {"shm": {"slots": 3}}}
    with pytest.raises(ConfigError) as info:
        build_config(file_data, {"APP_TRANSPORT__ZMQ__ENABLED": "false"})
    message = str(info.value)
    assert message == "transport.shm.slots must be a power of two, got 3", message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"APP_TRANSPORT__SHM__SLOTS": "3"}, "(from APP_TRANSPORT__SHM__SLOTS)"),
        ({"APP_TRANSPORT__SHM__SLOT_BYTES": "2097152"}, "(from APP_TRANSPORT__SHM__SLOT_BYTES)"),
        (
            {"APP_STORE__CLEANUP_KEEP_COUNT": "10", "APP_STORE__MAX_DATA_RETENTION": "5"},
            "(from APP_STORE__CLEANUP_KEEP_COUNT, APP_STORE__MAX_DATA_RETENTION)",
        ),
    ],
)
def test_cross_field_error_names_the_variables_that_set_its_keys(
    env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({}, {**env, "APP_TRANSPORT__ZMQ__ENABLED": "false"})
    message = str(info.value)
    assert message.endswith(expected), message
    assert "ZMQ" not in message


def test_bad_value_in_file_with_env_in_same_table_names_no_variable() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"transport": {"shm": {"slots": "x"}}}, {"APP_TRANSPORT__SHM__SPIN_US": "5"})
    assert "from" not in str(info.value), info.value
