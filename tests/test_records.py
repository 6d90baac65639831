"""Records: several seeds in one command, the append-only index, submission.json from the logs, the contract
check, and the statistics helper (p-values against scipy, refusal to pool different configurations)."""

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest

import train_gpt as T
from conftest import REPO, run_script, tiny_env

import make
import stats

SCRIPT = str(REPO / "train_gpt.py")


def records_env(sample, **overrides):
    """The two-layer model of the CLI tests, with a few logged steps and one warmup step."""
    return tiny_env(sample, WARMUP_STEPS=1, TRAIN_LOG_EVERY=4, VAL_BATCH_SIZE=65536, **overrides)


@pytest.fixture(scope="module")
def two_seeds(sample, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("seeds")
    env = records_env(sample, SEEDS="1337 42", RUN_ID="pair", RECORD_DIR=cwd / "record", RECORD_NAME="Tiny pair",
                      RECORD_GITHUB_ID="tester")
    result = run_script([sys.executable, SCRIPT], env, cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "next: python3 records/make.py" in result.stdout
    built = subprocess.run([sys.executable, str(REPO / "records" / "make.py"), str(cwd / "record")],
                           capture_output=True, text=True)
    assert built.returncode == 0 and "passes the records contract" in built.stdout, built.stdout + built.stderr
    return cwd, env


def test_seeds_run_one_after_another_each_with_its_own_log(two_seeds):
    cwd, _ = two_seeds
    logs = {seed: (cwd / "logs" / f"pair_seed{seed}.txt").read_text() for seed in (1337, 42)}
    assert {seed: make.summary_of(log)["seed"] for seed, log in logs.items()} == {1337: 1337, 42: 42}
    assert len({make.summary_of(log)["config_hash"] for log in logs.values()}) == 1
    # Different seeds, different initializations and data orders: different results.
    assert make.summary_of(logs[1337])["val_loss"] != make.summary_of(logs[42])["val_loss"]
    assert "SEED=1337('SEEDS')" in logs[1337] or "SEED=1337(SEEDS)" in logs[1337]


def test_the_index_records_every_launch_and_finish(two_seeds):
    cwd, _ = two_seeds
    events = [json.loads(line) for line in (cwd / "record" / "index.jsonl").read_text().splitlines()]
    assert [(e["event"], e["seed"]) for e in events] == [("launched", 1337), ("finished", 1337),
                                                        ("launched", 42), ("finished", 42)]


def test_the_records_folder_passes_the_contract_and_its_submission_comes_from_the_logs(two_seeds):
    cwd, _ = two_seeds
    folder = cwd / "record"
    expected = {"README.md", "submission.json", "train_gpt.py", "train_gpt_human.py", "index.jsonl",
                "train_seed1337.log", "train_seed42.log", "requirements.txt"}
    if importlib.util.find_spec("matplotlib"):
        expected.add("loss_curves.png")
        assert (folder / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    assert {p.name for p in folder.iterdir()} == expected
    submission = json.loads((folder / "submission.json").read_text())
    logs = [(folder / f"train_seed{seed}.log").read_text() for seed in (42, 1337)]
    losses = [make.summary_of(log)["val_loss"] for log in logs]
    assert submission["seeds"] == [42, 1337]
    assert submission["val_loss"] == pytest.approx(sum(losses) / 2)
    assert submission["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    assert submission["versions"]["torch"] and submission["code_sha256"] == make.summary_of(logs[0])["code_sha256"]
    # The fields recent records carry, as the challenge spells them.
    assert (submission["name"], submission["github_id"], submission["author"]) == ("Tiny pair", "tester", "")
    assert submission["track"] == "10min_16mb" and submission["hardware"] == "1x" + T.platform.machine()
    for log in logs:
        summary = make.summary_of(log)
        assert submission["seed_results"][str(summary["seed"])]["artifact_bytes"] == summary["bytes_total"]
    assert submission["bytes_total"] == max(r["artifact_bytes"] for r in submission["seed_results"].values())
    assert submission["compliance"]["artifact_under_16mb"] and submission["compliance"]["eval_under_budget"]
    assert f"torch=={submission['versions']['torch']}\n" in (folder / "requirements.txt").read_text()
    readme = (folder / "README.md").read_text()
    assert f"{submission['val_bpb']:.8f}" in readme and 'SEEDS="42 1337"' in readme
    assert "RECORD_NAME='Tiny pair' " in readme and "PRESET=smoke " in readme  # the command pastes into a shell
    assert re.search(r"\(git commit `([0-9a-f]{40}|none)`\)", readme)  # which commit made it
    assert stats.check_record(folder) == ([], [])


def test_the_contract_check_catches_a_hand_edit_and_a_missing_seed(two_seeds, tmp_path):
    import shutil
    folder = tmp_path / "record"
    shutil.copytree(two_seeds[0] / "record", folder)
    submission = json.loads((folder / "submission.json").read_text())
    (folder / "submission.json").write_text(json.dumps(dict(submission, val_bpb=submission["val_bpb"] - 0.01)))
    problems, _ = stats.check_record(folder)
    assert any("submission.json val_bpb" in p for p in problems)
    (folder / "submission.json").write_text(json.dumps(submission))
    with open(folder / "index.jsonl", "a") as index:  # a third seed was launched and never finished
        index.write(json.dumps(dict(event="launched", seed=7)) + "\n")
    problems, notes = stats.check_record(folder)
    assert problems == [] and any("[7]" in note for note in notes)
    (folder / "train_seed42.log").unlink()  # a finished seed dropped from the folder
    problems, notes = stats.check_record(folder)
    assert any("seeds [42]" in note for note in notes) and any("submission.json" in p for p in problems)


def test_the_contract_check_reports_a_nan_as_a_nan_and_a_packed_file_that_is_not_its_source(two_seeds, tmp_path):
    import shutil
    folder = tmp_path / "record"
    shutil.copytree(two_seeds[0] / "record", folder)
    submission = json.loads((folder / "submission.json").read_text())
    (folder / "submission.json").write_text(json.dumps(dict(submission, val_bpb=float("nan"))))
    problems, _ = stats.check_record(folder)
    assert problems == ["submission.json: val_bpb is nan, not a finite score"]
    log = (folder / "train_seed42.log").read_text()
    summary = make.summary_of(log)
    diverged = json.dumps(dict(summary, val_loss=float("nan")), sort_keys=True)
    (folder / "train_seed42.log").write_text(log.replace(json.dumps(summary, sort_keys=True), diverged))
    problems, _ = stats.check_record(folder)
    assert "train_seed42.log: val_loss is nan: a non-finite score is never a result" in problems
    (folder / "train_seed42.log").write_text(log)
    (folder / "submission.json").write_text(json.dumps(submission))
    assert stats.check_record(folder) == ([], [])
    readable = folder / "train_gpt_human.py"  # the packed file must decode to the readable one beside it
    readable.write_text(readable.read_text().replace("def main():", "def main():\n    print('edited')", 1))
    problems, _ = stats.check_record(folder)
    assert problems and "does not decode to train_gpt_human.py" in problems[0]


def test_a_different_configuration_is_refused_before_training(two_seeds, sample):
    cwd, _ = two_seeds
    env = records_env(sample, SEED=5, RUN_ID="intruder", RECORD_DIR=cwd / "record", MATRIX_LR="0.05")
    result = run_script([sys.executable, SCRIPT], env, cwd, timeout=120)
    assert result.returncode != 0 and "config error:" in result.stderr and "RECORD_DIR" in result.stderr
    assert "step:1/" not in (cwd / "logs" / "intruder.txt").read_text()
    assert not (cwd / "record" / "train_seed5.log").exists()


def fake_log(seed, val_loss, config_hash="aaaa", code="cccc"):
    summary = dict(seed=seed, val_loss=val_loss, val_bpb=val_loss / 2, config_hash=config_hash, code_sha256=code)
    return "...\nsummary_json: " + json.dumps(summary) + "\n"


def write_logs(folder, losses, **hashes):
    folder.mkdir()
    for seed, loss in losses.items():
        (folder / f"train_seed{seed}.log").write_text(fake_log(seed, loss, **hashes))
    return folder


def test_stats_refuses_to_pool_runs_of_different_configurations(tmp_path):
    folder = write_logs(tmp_path / "mixed", {1: 2.0, 2: 2.01})
    (folder / "train_seed3.log").write_text(fake_log(3, 1.9, config_hash="bbbb"))
    with pytest.raises(SystemExit, match="refusing to pool"):
        stats.load_runs([folder], "candidate")
    assert len(stats.load_runs([folder / "train_seed1.log", folder / "train_seed2.log"], "candidate")) == 2


CANDIDATE = [1.8800, 1.8831, 1.8792]
BASELINE = [1.8990, 1.8932, 1.8975, 1.9010]
# scipy 1.17.1: ttest_ind(BASELINE - 0.005, CANDIDATE, equal_var=False, alternative="greater") and
# ttest_1samp(CANDIDATE, 1.9 - 0.005, alternative="less"): the same tests, used where scipy is not installed.
SCIPY_P = {"welch": 0.0010910010791249155, "one_sample": 0.0034548024619442085}


def test_the_p_values_match_scipy():
    candidate = [dict(val_loss=v) for v in CANDIDATE]
    baseline = [dict(val_loss=v) for v in BASELINE]
    welch = stats.improvement_test(candidate, baseline)
    one_sample = stats.improvement_test(candidate, baseline_value=1.9)
    expected = dict(SCIPY_P)
    try:
        import numpy as np
        from scipy import stats as scipy_stats
        expected["welch"] = scipy_stats.ttest_ind(np.array(BASELINE) - 0.005, CANDIDATE, equal_var=False,
                                                  alternative="greater").pvalue
        expected["one_sample"] = scipy_stats.ttest_1samp(CANDIDATE, 1.9 - 0.005, alternative="less").pvalue
    except ImportError:
        pass
    assert welch["p"] == pytest.approx(expected["welch"], rel=1e-9)
    assert one_sample["p"] == pytest.approx(expected["one_sample"], rel=1e-9)
    assert welch["improvement"] == pytest.approx(sum(BASELINE) / 4 - sum(CANDIDATE) / 3)


def test_the_stats_command_prints_the_verdict(tmp_path):
    candidate = write_logs(tmp_path / "candidate", dict(zip((1, 2, 3), CANDIDATE)))
    baseline = write_logs(tmp_path / "baseline", dict(zip((1, 2, 3, 4), BASELINE)))
    result = run_script([sys.executable, str(REPO / "records" / "stats.py"), str(candidate), "--baseline",
                         str(baseline)], {}, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"p:0\.00109 -> significant at p < 0\.01", result.stdout)
    assert "mean      1.88076667" in result.stdout


def official_folder(root, name, submission, logs):
    """A records folder laid out as the challenge repository has them (no summary_json lines)."""
    folder = root / name
    folder.mkdir()
    if submission is not None:
        (folder / "submission.json").write_text(json.dumps(submission))
    for file_name, lines in logs.items():
        (folder / file_name).write_text("\n".join(lines) + "\n")
    return folder


def test_stats_reads_official_record_folders_as_they_are_in_the_challenge(tmp_path):
    full = official_folder(tmp_path, "full", {"seed_results": {"42": {"val_loss": 1.81, "val_bpb": 1.071},
                                                              "0": {"val_loss": 1.83, "val_bpb": 1.081}}}, {})
    bpb_only = official_folder(tmp_path, "bpb_only", {"seed_results": {"42": {"val_bpb": 1.08938974}}}, {
        "train_seed42.log": ["5453/20000 val_loss: 2.5257 val_bpb: 1.0976",
                             "final_int6_sliding_window_exact val_loss:2.50671564 val_bpb:1.08938974",
                             "final_int6_ttt_exact val_loss:3.07421378 val_bpb:1.33603200"]})  # a later, unscored eval
    logs_only = official_folder(tmp_path, "logs_only", {"name": "no seed results"}, {
        "train_seed7.log": ["step:10/20 val_loss:2.1 val_bpb:1.3 train_time:1ms step_avg:0.1ms",
                            "final_int8_zlib_roundtrip_exact val_loss:1.93 val_bpb:1.14",
                            "legal_ttt_exact val_loss:1.89 val_bpb:1.12",
                            "diagnostic quantized val_loss:1.95 val_bpb:1.15"],
        "train_seed8.log": ["quantized_ttt_phased val_loss:2.31944212 val_bpb:1.05989454 eval_time:508785ms"]})
    baseline = official_folder(tmp_path, "baseline", None, {
        "train.log": ["seed:1337", "final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570"]})
    runs = lambda folder: [(r["seed"], r["val_loss"], r["val_bpb"])  # noqa: E731
                           for r in stats.load_runs([folder], "x")]
    assert runs(full) == [(0, 1.83, 1.081), (42, 1.81, 1.071)]
    assert runs(bpb_only) == [(42, 2.50671564, 1.08938974)]  # the line submission.json scores, not the last one
    assert runs(logs_only) == [(7, 1.89, 1.12), (8, 2.31944212, 1.05989454)]
    assert runs(baseline) == [(1337, 2.07269931, 1.2243657)]


def test_the_acceptance_rule_is_a_setting(tmp_path):
    candidate = [dict(seed=s, val_loss=v) for s, v in enumerate([1.8880, 1.8884, 1.8890])]
    baseline = [dict(seed=s, val_loss=v) for s, v in enumerate([1.8893, 1.8899, 1.8902])]
    challenge = stats.improvement_test(candidate, baseline, margin=stats.RULES["challenge"][0])
    frontier = stats.improvement_test(candidate, baseline, margin=stats.RULES["frontier"][0])
    assert challenge["p"] > stats.RULES["challenge"][1]  # 1.3 mnats is not the challenge's 5
    assert frontier["p"] < stats.RULES["frontier"][1]  # but it is a frontier step at p < 0.25
    folder = tmp_path / "c"
    write_logs(folder, {1: 1.8880, 2: 1.8884, 3: 1.8890})
    result = subprocess.run([sys.executable, str(REPO / "records" / "stats.py"), str(folder), "--baseline-value",
                             "1.8895", "--rule", "frontier"], capture_output=True, text=True)
    assert result.returncode == 0 and "rule frontier" in result.stdout and "-> significant at p < 0.25" in result.stdout


def test_hand_filled_fields_survive_the_next_seed(two_seeds, sample, tmp_path):
    cwd, _ = two_seeds
    import shutil
    folder = tmp_path / "record"
    shutil.copytree(cwd / "record", folder)
    submission = json.loads((folder / "submission.json").read_text())
    submission.update(author="A. Person", blurb="written by hand")
    (folder / "submission.json").write_text(json.dumps(submission))
    env = records_env(sample, SEED=7, RUN_ID="third", RECORD_DIR=folder, RECORD_NAME="Tiny pair",
                      RECORD_GITHUB_ID="tester")
    result = run_script([sys.executable, SCRIPT], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    make.make(folder)
    after = json.loads((folder / "submission.json").read_text())
    assert after["seeds"] == [7, 42, 1337] and (after["author"], after["blurb"]) == ("A. Person", "written by hand")
    assert after["name"] == "Tiny pair"


def test_a_record_name_alone_writes_the_challenge_folder():
    hp, sources = T.Hyperparameters.from_env({"RECORD_NAME": "My idea: v2"})
    hp, sources = T.with_record_folder(hp, sources)
    assert re.fullmatch(r"records/track_10min_16mb/\d{4}-\d{2}-\d{2}_My_idea_v2", hp.record_dir)
    assert sources["record_dir"] == "implied:RECORD_NAME"
    explicit, _ = T.with_record_folder(*T.Hyperparameters.from_env({"RECORD_NAME": "x", "RECORD_DIR": "mine"}))
    assert explicit.record_dir == "mine"


def test_the_shipped_cpu_example_passes_the_records_contract():
    # records/example_cpu_smoke is what users copy from: it must be what the current contract accepts.
    problems, _ = stats.check_record(REPO / "records" / "example_cpu_smoke")
    assert problems == []


def test_stats_names_every_log_it_cannot_count(tmp_path, capsys):
    """A seed cut short (no summary_json) or diverged (a nan score) is named with the reason, never dropped in
    silence."""
    folder = write_logs(tmp_path / "three", {1: 2.0, 2: 2.01})
    (folder / "train_seed3.log").write_text(fake_log(3, 1.99).split("summary_json")[0])  # the run was cut short
    (folder / "train_seed4.log").write_text(fake_log(4, float("nan")))
    (folder / "train_seed5.log").write_text(fake_log(5, 1.98)[:-20])  # cut in the middle of its last line
    runs = stats.load_runs([folder], "candidate")
    assert [run["seed"] for run in runs] == [1, 2]
    err = capsys.readouterr().err
    assert "train_seed3.log: left out: no summary_json line" in err
    assert "train_seed4.log: left out: its score is not finite" in err
    assert "train_seed5.log: left out: its summary_json line is cut short" in err
    print(stats.describe(runs, "candidate"))  # a nan no longer reaches statistics.stdev
    for name in ("train_seed1.log", "train_seed2.log", "train_seed5.log"):
        (folder / name).unlink()
    with pytest.raises(SystemExit, match="no candidate run could be counted"):
        stats.load_runs([folder], "candidate")


def test_the_reproduce_command_pastes_into_bash_and_gives_back_every_value(tmp_path):
    values = {"RECORD_NAME": "CPU smoke example", "RECORD_BLURB": "it's \"quoted\", $HOME, `date`; a & b | c > d",
              "XSA_LAYERS": "-4,-3,-2,-1", "VE_LAYERS": "", "PRESET": "record,smoke", "SEED": "7"}
    config = " ".join(f"{name}={value!r}(env)" for name, value in values.items()) + " ITERATIONS=20000(default)"
    command = make.reproduce_command(f"config: {config}\n", world_size=8, seeds=[42, 0])
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    # Run it with the launcher replaced by a program that prints what it was given.
    names = [name for name in values if name != "SEED"] + ["SEEDS"]
    show = (f"{sys.executable} -c 'import json, os; "
            f"print(json.dumps({{n: os.environ.get(n) for n in {json.dumps(names)}}}))'")
    launcher = "torchrun --standalone --nproc_per_node=8 train_gpt.py"
    assert command.endswith(launcher)
    printed = subprocess.run(["bash", "-c", command.replace(launcher, show)], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, check=True).stdout
    expected = {name: value for name, value in values.items() if name != "SEED"} | {"SEEDS": "42 0"}
    assert json.loads(printed) == expected and "ITERATIONS" not in command
