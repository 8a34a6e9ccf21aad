from __future__ import annotations

from pathlib import Path

import pytest

from fraudstream.streams.settings import RANGES, Settings, SettingsError, describe


def test_environment_variables_fill_the_typed_sections():
    s = Settings.from_env({
        "FRAUDSTREAM_KAFKA_BOOTSTRAP": "kafka-1:9093,kafka-2:9093",
        "FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FRAUDSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FRAUDSTREAM_KAFKA_SASL_USERNAME": "fraud",
        "FRAUDSTREAM_KAFKA_SASL_PASSWORD": "secret",
        "FRAUDSTREAM_KAFKA_SSL_CAFILE": "/etc/ca.pem",
        "FRAUDSTREAM_WORKER_BATCH_MAX": "256",
        "FRAUDSTREAM_WORKER_DATA_DIR": "/var/lib/fraudstream",
        "FRAUDSTREAM_KAFKA_EMBEDDED": "false",
        "PATH": "/usr/bin",
    })
    assert s.worker.batch_max == 256
    assert s.worker.data_dir == Path("/var/lib/fraudstream")
    assert s.kafka.client_config() == {
        "bootstrap.servers": "kafka-1:9093,kafka-2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "fraud",
        "sasl.password": "secret",
        "ssl.ca.location": "/etc/ca.pem",
    }


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"FRAUDSTREAM_WORKER_BATCH_MAX": "many"}, "FRAUDSTREAM_WORKER_BATCH_MAX"),
        ({"FRAUDSTREAM_CODEC_INPUT_FORMAT": "xml"}, "avro, json"),
        ({"FRAUDSTREAM_KAFKA_BOOTSTAP": "x:1"}, "unknown setting"),
        ({"FRAUDSTREAM_KAFKA_EMBEDDED": "maybe"}, "FRAUDSTREAM_KAFKA_EMBEDDED"),
    ],
)
def test_a_bad_setting_is_refused_by_name(env, needle):
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env(env)


def test_settings_round_trip_through_the_environment_of_a_child_process():
    s = Settings().replace(kafka={"bootstrap": "127.0.0.1:1234", "embedded": True},
                           worker={"batch_max": 64})
    assert Settings.from_env(s.to_env()) == s


def test_every_setting_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [name for name, _default, _doc in describe() if name not in readme]
    assert not missing


def test_faust_gets_the_same_sasl_and_tls_settings_as_librdkafka(tmp_path):
    import faust

    from fraudstream.streams.worker.app import faust_credentials

    kafka = Settings.from_env({
        "FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FRAUDSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "FRAUDSTREAM_KAFKA_SASL_USERNAME": "fraud",
        "FRAUDSTREAM_KAFKA_SASL_PASSWORD": "secret",
    }).kafka
    creds = faust_credentials(kafka)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("fraud", "secret")
    assert str(creds.mechanism.value) == "SCRAM-SHA-256"
    assert creds.ssl_context is not None and str(creds.protocol.value) == "SASL_SSL"
    assert faust_credentials(Settings().kafka) is None  # PLAINTEXT


@pytest.mark.parametrize("name, raw, allowed", [
    ("FRAUDSTREAM_WORKER_BATCH_MAX", "-5", "out of range, allowed >= 1"),
    ("FRAUDSTREAM_WORKER_BATCH_MAX", "0", "out of range, allowed >= 1"),
    ("FRAUDSTREAM_WORKER_METRICS_PORT", "65536", "out of range, allowed 0 to 65535"),
    ("FRAUDSTREAM_WORKER_METRICS_PORT", "-1", "out of range, allowed 0 to 65535"),
    ("FRAUDSTREAM_KAFKA_PARTITIONS", "0", "out of range, allowed >= 1"),
    ("FRAUDSTREAM_WORKER_COMMIT_INTERVAL_S", "0", "out of range, allowed > 0"),
    ("FRAUDSTREAM_SCORING_BUDGET_MS", "nan", "not a finite number, allowed > 0"),
    ("FRAUDSTREAM_SCORING_BUDGET_MS", "inf", "not a finite number, allowed > 0"),
    ("FRAUDSTREAM_SCORING_ONLINE_MAX_WEIGHT", "1.5", "out of range, allowed 0 to 1"),
    ("FRAUDSTREAM_SCORING_DRIFT_JS_THRESHOLD", "0",
     "out of range, allowed 0 to 1 (0 excluded)"),
    ("FRAUDSTREAM_FEATURES_ALLOWED_LATENESS_S", "-1", "out of range, allowed >= 0"),
])
def test_an_out_of_range_value_is_refused_with_its_name_value_and_range(name, raw, allowed):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: raw})
    assert str(err.value) == f"{name}={raw}: {allowed}"


def test_the_bounds_themselves_are_accepted():
    s = Settings.from_env({"FRAUDSTREAM_WORKER_METRICS_PORT": "65535",
                           "FRAUDSTREAM_WORKER_BATCH_MAX": "1",
                           "FRAUDSTREAM_SCORING_ONLINE_MAX_WEIGHT": "0",
                           "FRAUDSTREAM_SCORING_DRIFT_JS_THRESHOLD": "1"})
    assert (s.worker.metrics_port, s.worker.batch_max) == (65535, 1)


def test_every_numeric_setting_has_an_allowed_range_that_holds_its_default():
    """A new int or float setting needs an entry in fraudstream.streams.settings.RANGES."""
    from dataclasses import fields
    from typing import get_type_hints

    numeric, defaults = set(), {}
    for section in fields(Settings):
        obj = getattr(Settings(), section.name)
        hints = get_type_hints(type(obj))
        for f in fields(obj):
            if hints[f.name] in (int, float):
                name = f"FRAUDSTREAM_{section.name}_{f.name}".upper()
                numeric.add(name)
                defaults[name] = getattr(obj, f.name)
    assert numeric - set(RANGES) == set(), "add these to fraudstream.streams.settings.RANGES"
    assert set(RANGES) - numeric == set()
    assert [n for n, v in defaults.items() if v not in RANGES[n]] == []
