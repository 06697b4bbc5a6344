import pytest

from anomaly_vae import Config, ConfigError


def test_defaults_are_valid_and_roundtrip():
    c = Config()
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("field,value", [("target_fpr", 0.0), ("target_fpr", 1.5), ("lr", 0),
                                         ("hidden", ()), ("numeric_transform", "box"),
                                         ("calibration_fraction", 0.7), ("latent_dim", 0)])
def test_out_of_range_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        Config(**{field: value})


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="laten_dim"):
        Config.from_dict({"laten_dim": 3})


def test_resolve_rule_depends_on_rows_and_features():
    small = Config().resolve(n_rows=500, n_features=6)
    big = Config().resolve(n_rows=50_000, n_features=200)
    assert small.hidden == big.hidden == (128, 64)          # one width for every table
    assert small.latent_dim == 8 and small.batch_size == 32
    assert big.latent_dim == 16 and big.batch_size == 256
    assert 20 <= small.max_epochs <= 400 and 20 <= big.max_epochs <= 400
    assert Config(latent_dim=3, max_epochs=7).resolve(1000, 10).latent_dim == 3
