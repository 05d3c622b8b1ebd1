"""The precision checker on hand-made directories of logits."""
from __future__ import annotations

import numpy as np
import pytest

from llmserve.tools.acc_allclose import compare_dirs, main


def write_dump(directory, arrays: dict[str, np.ndarray]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(directory / name, array)
    return str(directory)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return {f"req-{r}_{p:05d}.npy": rng.standard_normal(64).astype(np.float32) for r in "ab" for p in range(3)}


def test_identical_directories_pass(tmp_path, logits, capsys):
    base = write_dump(tmp_path / "base", logits)
    new = write_dump(tmp_path / "new", logits)
    result = compare_dirs(base, new)
    assert result.is_ok and result.num_passed == result.num_compared == 6
    assert main(["--base_path", base, "--new_path", new]) == 0
    assert "passed 6/6" in capsys.readouterr().out


def test_differences_within_tolerance_pass(tmp_path, logits):
    base = write_dump(tmp_path / "base", logits)
    new = write_dump(tmp_path / "new", {name: array + 1e-7 for name, array in logits.items()})
    assert main(["--base_path", base, "--new_path", new, "--rtol", "1e-5", "--atol", "1e-5"]) == 0


def test_perturbation_beyond_tolerance_fails_and_names_the_worst_file(tmp_path, logits, capsys):
    perturbed = dict(logits)
    perturbed["req-b_00001.npy"] = logits["req-b_00001.npy"] + np.float32(0.5)
    perturbed["req-a_00002.npy"] = logits["req-a_00002.npy"] + np.float32(1e-3)
    base = write_dump(tmp_path / "base", logits)
    new = write_dump(tmp_path / "new", perturbed)
    result = compare_dirs(base, new, rtol=1e-5, atol=1e-5)
    assert not result.is_ok
    assert result.num_passed == 4 and result.failed == ["req-a_00002.npy", "req-b_00001.npy"]
    assert result.worst_abs.name == "req-b_00001.npy" and result.worst_abs.value == pytest.approx(0.5, rel=1e-5)
    assert main(["--base_path", base, "--new_path", new]) == 1
    out = capsys.readouterr().out
    assert "worst absolute error: 5.000e-01 in req-b_00001.npy" in out and out.rstrip().endswith("FAIL")


def test_a_file_missing_on_either_side_fails(tmp_path, logits, capsys):
    fewer = {name: array for name, array in logits.items() if name != "req-a_00001.npy"}
    base = write_dump(tmp_path / "base", logits)
    new = write_dump(tmp_path / "new", fewer)
    assert compare_dirs(base, new).missing_in_new == ["req-a_00001.npy"]
    assert compare_dirs(new, base).missing_in_base == ["req-a_00001.npy"]
    assert main(["--base_path", base, "--new_path", new]) == 1
    assert main(["--base_path", new, "--new_path", base]) == 1
    assert "missing in new: 1: req-a_00001.npy" in capsys.readouterr().out


def test_shape_mismatch_fails(tmp_path, logits):
    reshaped = dict(logits)
    reshaped["req-a_00000.npy"] = logits["req-a_00000.npy"][:32]
    base = write_dump(tmp_path / "base", logits)
    new = write_dump(tmp_path / "new", reshaped)
    result = compare_dirs(base, new)
    assert not result.is_ok and result.shape_mismatches == ["req-a_00000.npy (64,) vs (32,)"]
    assert main(["--base_path", base, "--new_path", new]) == 1


def test_nan_in_new_fails(tmp_path, logits):
    broken = dict(logits)
    broken["req-a_00000.npy"] = np.full(64, np.nan, dtype=np.float32)
    base = write_dump(tmp_path / "base", logits)
    new = write_dump(tmp_path / "new", broken)
    assert main(["--base_path", base, "--new_path", new]) == 1


def test_an_empty_base_directory_fails(tmp_path, capsys):
    base, new = tmp_path / "base", tmp_path / "new"
    base.mkdir()
    new.mkdir()
    assert main(["--base_path", str(base), "--new_path", str(new)]) == 1
    assert "no .npy files" in capsys.readouterr().out


def test_a_directory_that_does_not_exist_fails(tmp_path, logits):
    base = write_dump(tmp_path / "base", logits)
    assert main(["--base_path", base, "--new_path", str(tmp_path / "absent")]) == 1


def test_the_check_precision_verb_passes_and_fails_alike(tmp_path, logits, capsys):
    from llmserve.cli import main as llmserve

    base = write_dump(tmp_path / "base", logits)
    same = write_dump(tmp_path / "same", logits)
    off = write_dump(tmp_path / "off", {name: array + np.float32(0.1) for name, array in logits.items()})
    assert llmserve(["check-precision", "--base_path", base, "--new_path", same]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")
    assert llmserve(["check-precision", "--base_path", base, "--new_path", off, "--atol", "1e-3"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL")
