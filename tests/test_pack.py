"""Code bytes: the artifact counts the packed, self-extracting form of the running source, and running that form is
running the same program."""

import re
import subprocess
import sys
import traceback

import pytest
import torch

import train_gpt as T
from conftest import REPO, run_script, small_hp, tiny_env

SCRIPT = REPO / "train_gpt.py"

TOY = '''"""A module docstring."""
import sys  # a comment


def f(x):
    """Only a docstring, then code."""
    return "#not a comment" + x  # a comment after code


class C:
    """A class whose whole body is its docstring."""


def boom():
    raise RuntimeError("boom")


if __name__ == "__main__":
    print("main ran", f("!"), sys.argv[1:])
    boom()
'''


def test_stripping_removes_comments_and_docstrings_and_keeps_every_line_where_it_was():
    stripped = T.strip_source(TOY)
    assert "docstring" not in stripped and "# a comment" not in stripped and "#not a comment" in stripped
    assert len(stripped.splitlines()) == len(TOY.splitlines())
    for original, kept in zip(TOY.splitlines(), stripped.splitlines()):
        assert kept == "" or kept.strip() == "pass" or original.startswith(kept)
    namespace = {}
    exec(compile(stripped, "toy", "exec"), namespace)
    assert namespace["f"]("?") == "#not a comment?"


def test_the_packed_source_is_small_and_decodes_to_the_stripped_source():
    source = SCRIPT.read_bytes()
    packed, compressor, sizes = T.pack_source(source)
    print(f"\ncode bytes: raw {len(source):,}, packed " + ", ".join(f"{k} {v:,}" for k, v in sizes.items())
          + f" (shipped: {compressor})")
    assert len(packed) < len(source) / 4 and len(packed) == min(sizes.values())  # comments, docstrings, then entropy
    assert T.unpack_source(packed) == T.strip_source(source.decode()).encode()
    assert T.Code.read(SCRIPT, pack=False).counted == source


def test_a_packed_file_runs_as_main_and_its_tracebacks_name_the_readable_line(tmp_path):
    line = TOY.splitlines().index('    raise RuntimeError("boom")') + 1  # its line in the readable source
    (tmp_path / "toy_packed.py").write_bytes(T.pack_source(TOY.encode(), "toy.py")[0])
    result = subprocess.run([sys.executable, str(tmp_path / "toy_packed.py"), "arg"], capture_output=True, text=True)
    assert "main ran #not a comment! ['arg']" in result.stdout
    assert f'File "toy.py (packed)", line {line}, in boom' in result.stderr, result.stderr
    namespace = {"__name__": "imported"}
    exec(T.pack_source(TOY.encode(), "toy.py")[0], namespace)
    with pytest.raises(RuntimeError) as raised:
        namespace["boom"]()
    frame = traceback.extract_tb(raised.value.__traceback__)[-1]
    assert (frame.filename, frame.lineno) == ("toy.py (packed)", line)


def test_a_source_that_does_not_parse_or_a_missing_compressor_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"does not parse \(line 3"):
        T.pack_source(b"x = 1\n\ndef broken(:\n", "toy.py")
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "brotli" else real_import(name, *a, **k))
    with pytest.raises(T.ConfigError, match="PACK_CODE=1.*pip install brotli.*PACK_CODE=0"):
        T.Hyperparameters(compressor="zlib")
    T.Hyperparameters(compressor="zlib", pack_code=False)  # the raw file needs no compressor


def test_packing_leaves_the_size_target_more_model_bytes():
    torch.manual_seed(0)
    hp = small_hp(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=512, gptq=False)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    raw = len(SCRIPT.read_bytes())
    packed = len(T.pack_source(SCRIPT.read_bytes())[0])
    groups = T.quantized_tensor_groups(model)
    free = len(T.quantize_to_fit(model.state_dict(), groups, T.dataclasses.replace(hp, size_target_bytes=0), None, 0,
                                 log=lambda *_: None)[1])
    target = T.dataclasses.replace(hp, size_target_bytes=raw + free // 2)  # binds with the raw file
    blobs = {name: T.quantize_to_fit(model.state_dict(), groups, target, None, code, log=lambda *_: None)[1]
             for name, code in (("raw", raw), ("packed", packed))}
    assert raw + len(blobs["raw"]) <= target.size_target_bytes
    assert len(blobs["packed"]) > len(blobs["raw"])


def results(log):
    """Every loss and score line, and the counted code bytes."""
    lines = re.findall(r"^(step:\d+/\d+ (?:train|val)_loss:\S+|final_\w+_exact .*|artifact: bytes_code:\d+)", log, re.M)
    return [re.sub(r" train_time.*", "", line) for line in lines]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.cuda_path)])  # 2: in CI's second step
def test_the_packed_file_trains_and_scores_exactly_like_the_readable_file(sample, tmp_path, nproc):
    packed_dir = tmp_path / "elsewhere"  # away from the readable file: the packed one must not need it
    packed_dir.mkdir()
    (packed_dir / "train_gpt.py").write_bytes(T.pack_source(SCRIPT.read_bytes())[0])
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    logs = {}
    for name, script in (("readable", SCRIPT), ("packed", packed_dir / "train_gpt.py")):
        env = tiny_env(sample, RUN_ID=name, TRAIN_BATCH_TOKENS=2048, ITERATIONS=3, VAL_BATCH_SIZE=16384)
        result = run_script(launcher + [str(script)], env, tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs[name] = (tmp_path / "logs" / f"{name}.txt").read_text()
    assert results(logs["readable"]) == results(logs["packed"]) and len(results(logs["packed"])) >= 6
    assert "code: bytes_counted:" in logs["packed"] and " packed_file" in logs["packed"]
    assert re.search(r"^code: bytes_counted:\d+ bytes_source:\d+ packed:brotli", logs["readable"], re.M)


def test_the_packer_names_the_file_that_does_not_parse(tmp_path):
    broken = tmp_path / "mine.py"
    broken.write_text("def f(:\n")
    result = subprocess.run([sys.executable, str(REPO / "records" / "pack.py"), str(broken), str(tmp_path / "out.py")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and f"{broken}: the source does not parse (line 1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.py").exists()


def test_the_code_size_benchmark_counts_what_a_run_counts_and_every_line(tmp_path):
    source = tmp_path / "two.py"
    source.write_text('"""Doc."""\n\n\nclass Run:\n    def __init__(self):\n        self.hp = 1\n\n\n'
                      '# ' + "=" * 20 + "\n# MAIN\n# " + "=" * 20 + "\ndef train(run):\n    run.model = 2\n"
                      + "x = 1\n" * 3
                      + "class Hyperparameters:\n    pass\n")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "code_size.py"), "--source", str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    counted = len(T.pack_source(source.read_bytes())[0])
    assert f"counted_bytes:{counted} " in result.stdout and " lines:18 " in result.stdout
    assert re.search(r"preamble +8 lines", result.stdout) and re.search(r"MAIN +10 lines", result.stdout)
    assert "run_attributes: 2 (1 set outside Run.__init__: model)" in result.stdout
