"""python -m raven.bench precision: fp32 against bf16 tables, each row's ratio that of its two printed values."""

from __future__ import annotations

import re

import pytest

import raven.bench
from raven.bench import main
from raven.eval.fid import fid_available
from raven.step import bf16_is_native

ROW = re.compile(r"^(?P<name>.+?)\s+(?P<fp32>[\d,.]+)\s+(?P<bf16>[\d,.]+)\s+(?P<ratio>[\d.]+)x$")


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_precision_bench_prints_fp32_against_bf16_training(capsys, data_dir):
    assert main(["precision", "--stages", "train", "--steps", "2", "--warmup", "1", "--rounds", "1",
                 "--ks", "2,3", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("Training (raven, batch 128) on cpu") for line in lines)
    rows = {m["name"]: m for m in map(ROW.match, lines) if m}
    assert list(rows) == ["solo (raven.step.train_step)", "pack of 2", "pack of 3"]
    for row in rows.values():
        fp32, bf16 = number(row["fp32"]), number(row["bf16"])
        # Printed rounded to whole pairs/s: the ratio agrees to that rounding.
        assert fp32 > 0 and bf16 > 0
        assert number(row["ratio"]) == pytest.approx(bf16 / fp32, abs=0.01 + (bf16 + fp32) / fp32 ** 2)


def test_precision_bench_prints_the_attacks_speed_and_the_share_each_precision_fools(capsys, data_dir):
    assert main(["precision", "--stages", "attack", "--images", "40", "--attack-steps", "3", "--warmup", "0",
                 "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    rows = {m["name"]: m for m in map(ROW.match, out.splitlines()) if m}
    assert [name.split(",")[0] for name in rows] == ["paper KL attack", "strong protocol's PGD (kl"]
    for row in rows.values():
        fp32, bf16 = number(row["fp32"]), number(row["bf16"])
        assert fp32 > 0 and bf16 > 0
        assert number(row["ratio"]) == pytest.approx(bf16 / fp32, abs=0.01 + (bf16 + fp32) / fp32 ** 2)
    guards = re.findall(r"fooled fp32 ([\d.]+) %, bf16 ([\d.]+) % \(([+-][\d.]+) points", out)
    assert len(guards) == 2
    for fp32, bf16, points in guards:  # each share is a count of the 40 images, and the difference is theirs
        assert float(fp32) * 40 / 100 == pytest.approx(round(float(fp32) * 40 / 100), abs=0.05)
        assert float(points) == pytest.approx(float(bf16) - float(fp32), abs=0.11)


@pytest.mark.skipif(not fid_available()[0], reason=fid_available()[1])
@pytest.mark.parametrize("native", [True, False])
def test_precision_bench_prints_fid_speed_and_the_guard(capsys, data_dir, monkeypatch, native):
    """Every network's row; where bfloat16 is not native (an AVX2 CPU, whose oneDNN has no bf16 convolution),
    the bf16 row is left out with a line that says why."""
    if native and not bf16_is_native("cpu"):
        pytest.skip("this CPU has no native bfloat16")
    monkeypatch.setattr(raven.bench, "bf16_is_native", lambda device: native)
    assert main(["precision", "--stages", "fid", "--fid-images", "3", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "the guard: |FID - fp32 FID| < 0.5" in out
    # name, images/s, ratio to the shipped network, FID, FID - fp32 FID
    rows = [line.rsplit(maxsplit=4) for line in out.splitlines()
            if line.startswith(("TorchScript", "FastInception")) and "not measured" not in line]
    names = [row[0].strip() for row in rows]
    bf16 = ["FastInception, bf16"] if native else []
    assert names == ["TorchScript network as shipped, fp32", "FastInception, fp32", *bf16]
    assert ("FastInception, bf16: not measured (no native bfloat16 on this cpu)" in out) is not native
    fids = [float(row[3]) for row in rows]
    differences = [float(row[4]) for row in rows]
    # The fast fp32 network computes the shipped network's FID; each difference is against the fast fp32 FID.
    assert fids[0] == pytest.approx(fids[1], rel=1e-3)
    assert differences == pytest.approx([f - fids[1] for f in fids], abs=2e-3)


def test_precision_bench_rejects_an_unknown_stage(capsys):
    with pytest.raises(SystemExit):
        main(["precision", "--stages", "train,attacks"])
    assert "expected comma-separated stages from train,attack,fid, got 'train,attacks'" in capsys.readouterr().err
