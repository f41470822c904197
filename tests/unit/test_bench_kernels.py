"""`python -m benchmarks.kernels`: every linear form the tuner may pick is measured, and bad counts are refused."""

from __future__ import annotations

import pytest

from afd.kernels import packed_linear, tuning
from benchmarks import kernels as bench_kernels


def test_every_candidate_form_is_measured_against_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_kernels, "ROTATION_BYTES", 1 << 18)
    monkeypatch.setattr(bench_kernels, "REPEATS", 2)
    (row,) = bench_kernels.measure_linear(64, 128, row_counts=(32,))
    assert set(row["gb_s"]) == set(tuning.candidates()) and row["rows"] == 32
    assert ("packed" in row["gb_s"]) == packed_linear.available()
    assert row["ratio_vs_baseline"]["library"] == 1.0
    assert all(r["min"] <= r["median"] <= r["max"] for r in row["gb_s"].values())  # rates, not their size: timing


@pytest.mark.parametrize("flag", ["--linear-rows", "--experts-tokens"])
def test_counts_below_one_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_kernels.main([flag, "0"])
    assert exit_info.value.code == 2
    assert "take counts of at least 1" in capsys.readouterr().err
