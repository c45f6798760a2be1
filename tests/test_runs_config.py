"""Configurations written before an option existed read back with its default."""

from cleanprior.runs.config import with_defaults


def test_missing_entries_take_their_defaults_at_every_depth():
    defaults = {"a": 1, "sud": {"warmup": 0, "lambda_1": 1.0}, "options": {}}
    saved = {"a": 2, "sud": {"lambda_1": 0.03}, "options": {"zeta": 0.3}, "extra": None}
    merged = with_defaults(saved, defaults)
    assert merged == {"a": 2, "sud": {"warmup": 0, "lambda_1": 0.03}, "options": {"zeta": 0.3}, "extra": None}
    assert saved == {"a": 2, "sud": {"lambda_1": 0.03}, "options": {"zeta": 0.3}, "extra": None}
    assert with_defaults({"sud": None}, defaults)["sud"] is None
