"""bench/ablation.py: every variant is a valid configuration, and the summary over seeds is right."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import ablation

from learner.demo import DEFAULT_CONFIGS
from learner.fidelity import ROW_METRICS, summarize
from services.settings import load_settings


@pytest.mark.parametrize("variant", list(ablation.VARIANTS))
def test_every_variant_loads_as_the_demo_configuration_with_its_change(variant: str) -> None:
    overrides = ablation.VARIANTS[variant][1]
    settings = load_settings(DEFAULT_CONFIGS, overrides, environ={})
    demo = load_settings(DEFAULT_CONFIGS, [], environ={})
    assert (settings == demo) == (not overrides)


def test_the_ratio_variant_trains_on_eight_keep_ratios() -> None:
    settings = load_settings(DEFAULT_CONFIGS, ablation.VARIANTS["ratio_budgets"][1], environ={})
    assert [budget.label for budget in settings.sparsity.budgets] == [
        "r=1", "r=0.75", "r=0.5", "r=0.375", "r=0.25", "r=0.1875", "r=0.125", "r=0.0625"]


def test_unknown_variants_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ablation.parse_args(["--variants", "default,sharpness"])
    assert "unknown variant(s) ['sharpness']" in capsys.readouterr().err


def _row(variant: str, seed: int, dense: float, met: bool) -> dict:
    values = dict.fromkeys(ROW_METRICS, 0.5) | {"trained_dense": dense}
    return {"variant": variant, "seed": seed, **values,
            "claims": {"claim3_no_dense_damage": {"applies": True, "met": met}}}


def test_the_summary_spreads_each_variant_over_its_own_seeds() -> None:
    rows = [_row("default", 0, 0.90, True), _row("no_kl", 0, 0.80, False), _row("default", 1, 0.94, False)]
    summary = summarize(rows, by="variant")
    assert list(summary) == ["default", "no_kl"]
    assert summary["default"]["seeds"] == [0, 1]
    assert summary["default"]["trained_dense"]["mean"] == pytest.approx(0.92)
    assert summary["default"]["trained_dense"]["std"] == pytest.approx(0.0282843, abs=1e-6)
    assert summary["default"]["claims_met"] == {"claim3_no_dense_damage": "1/2"}
    assert summary["no_kl"]["trained_dense"] == {"mean": 0.80, "std": 0.0, "min": 0.80, "max": 0.80}


def _config(**changes: object) -> dict:
    config = {"family": "scenes", "tune_seed": 7, "tune_items": 300, "steps": 40, "budgets": ["r=1"],
              "variants": {name: {"overrides": overrides} for name, (_, overrides) in ablation.VARIANTS.items()}}
    return config | changes


def test_resume_keeps_only_runs_measured_the_same_way() -> None:
    previous = {"config": _config(), "rows": [_row("default", 0, 0.9, True), _row("no_kl", 0, 0.9, True)]}
    now = _config()
    now["variants"] = now["variants"] | {"no_kl": {"overrides": ["learner.beta=0.5"]}}
    assert [row["variant"] for row in ablation.resumable_rows(previous, now)] == ["default"]
    with pytest.raises(SystemExit, match=r"differs in \['tune_items'\]"):
        ablation.resumable_rows(previous, _config(tune_items=100))
