"""benchmarks/ablation.py: variants x seeds, a failed run reported without stopping the rest, and the significance
test of records/stats.py over the finished seeds."""

import subprocess
import sys

import pytest
import stats
from conftest import REPO, run_script, tiny_env


@pytest.mark.cuda_path  # six whole runs: CI's second step holds them
def test_the_ablation_runs_every_variant_and_seed_goes_past_a_failure_and_ends_with_the_test(sample, tmp_path):
    settings = [f"{k}={v}" for k, v in tiny_env(sample, ITERATIONS=3).items()]
    out = tmp_path / "ablation.md"
    result = run_script([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--seeds", "1", "2",
                         "--log-dir", str(tmp_path), "--out", str(out), "--settings", *settings,
                         "--variant", "base", "--variant", "bad width", "MODEL_DIM=63",
                         "--variant", "no smear", "SMEAR_GATE=0"], {}, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # one variant failed, and says so in its exit code
    runs_table, verdicts = result.stdout.split("\n\n")
    lines = runs_table.splitlines()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]) for line in lines if line.startswith("| ")}
    for seed in ("1", "2"):
        assert ("base", seed, "ok") in rows and ("no smear", seed, "ok") in rows
    failed = [line for line in lines if line.startswith("| bad width |")]
    assert len(failed) == 2 and all("FAILED (exit 1)" in line and "MODEL_DIM" in line for line in failed)
    assert out.read_text() == result.stdout  # the file is the printed table
    # The verdict is records/stats.py's test over the same logs.
    logs = lambda variant: [str(tmp_path / "logs" / f"ablation_{variant}_seed{seed}.txt") for seed in (1, 2)]
    test = stats.improvement_test(stats.load_runs(logs("no_smear"), "c"), stats.load_runs(logs("base"), "b"))
    verdict = next(line for line in verdicts.splitlines() if line.startswith("| no smear | 2 |"))
    assert f"improvement {test['improvement']:+.5f} nats" in verdict and f"p {test['p']:.3g}" in verdict
    assert "| bad width | 0 | - | - | - | not tested: both need 2 finished seeds |" in verdicts


def test_the_ablation_refuses_what_is_not_a_setting_and_the_seeds_it_sets_itself(tmp_path):
    script = [sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--dry-run"]
    for args, message in ((["--variant", "a", "model_dim=3"], "not KEY=VALUE"),
                          (["--variant", "a", "SEED=3"], "give the seeds with --seeds"),
                          (["--variant", "a b", "--variant", "a_b"], "variant names must differ")):
        result = subprocess.run(script + args, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode != 0 and message in result.stdout + result.stderr
