"""The fused Triton kernels against the unfused math they replace, run on the CPU in Triton's interpreter
(TRITON_INTERPRET=1). Without Triton installed these tests skip, saying so; CI installs it."""

import importlib.util
import re
import sys

import pytest
import torch

import train_gpt as T
from conftest import REPO, run_script, tiny_env

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (pip install -r requirements-optional.txt)")


@needs_triton
def test_the_fused_kernels_equal_the_unfused_math_in_tritons_interpreter(tmp_path):
    """tests/fused_kernel_worker.py, in a process of its own that sets TRITON_INTERPRET=1 before importing Triton:
    the kernel's losses and gradients (fp32 and bf16, logits beyond the softcap) and a model's loss and gradients."""
    result = run_script([sys.executable, str(REPO / "tests" / "fused_kernel_worker.py")], {"TRITON_INTERPRET": "1"},
                        tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fused kernels: equal to the unfused math" in result.stdout


@needs_triton
@pytest.mark.cuda_path  # a whole run: CI's second step
def test_the_packed_file_trains_through_the_fused_kernel(sample, tmp_path):
    """A packed file compiles its kernels from its own source (it puts it in linecache): a short run through the
    kernel in Triton's interpreter. Its math against the unfused one: the worker's checks above."""
    packed = tmp_path / "elsewhere" / "train_gpt.py"
    packed.parent.mkdir()
    packed.write_bytes(T.pack_source(T.Path(T.__file__).read_bytes())[0])
    env = tiny_env(sample, RUN_ID="fused", ITERATIONS=2, TRAIN_BATCH_TOKENS=256, GPTQ_CALIBRATION_BATCHES=1,
                   FUSED_CE_ENABLED=1, FUSED_MLP_ENABLED=1, TRITON_INTERPRET=1)
    result = run_script([sys.executable, str(packed)], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "fused.txt").read_text()
    assert re.search(r"^fused_ce: on \(Triton\)$", log, re.M) and re.search(r"^fused_mlp: on \(Triton\)$", log, re.M)
    assert len(re.findall(r"^step:\d+/2 train_loss:", log, re.M)) == 2


@pytest.mark.cuda_path  # a whole run: CI's second step
def test_without_a_device_triton_drives_the_fused_switch_runs_the_unfused_math_and_says_so(sample, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not T.triton_drives(torch.device("cpu"))
    result = run_script([sys.executable, str(T.Path(T.__file__))],
                        tiny_env(sample, RUN_ID="unfused", ITERATIONS=1, FUSED_CE_ENABLED=1, FUSED_MLP_ENABLED=1),
                        tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "unfused.txt").read_text()
    for switch in ("fused_ce", "fused_mlp"):
        why_not = "is not installed|does not drive cpu"
        assert re.search(rf"^{switch}: the same math unfused \(Triton ({why_not})\)$", log, re.M)


def test_the_fused_loss_and_mile_are_refused_together():
    with pytest.raises(T.ConfigError, match="FUSED_CE_ENABLED"):
        T.Hyperparameters.from_env({"FUSED_CE_ENABLED": "1", "MILE_GAMMA": "1.1"})
    with pytest.raises(T.ConfigError, match="FUSED_CE_ENABLED.*LOGIT_SOFTCAP"):
        T.Hyperparameters.from_env({"FUSED_CE_ENABLED": "1", "LOGIT_SOFTCAP": "0"})


def test_the_fused_mlp_is_refused_with_swiglu():
    with pytest.raises(T.ConfigError, match="FUSED_MLP_ENABLED.*MLP_ACTIVATION"):
        T.Hyperparameters.from_env({"FUSED_MLP_ENABLED": "1", "MLP_ACTIVATION": "swiglu"})


def compile_for_sm90(kernel, types, constexprs, options):
    """Triton's ahead-of-time compile for an H100 (sm_90) on this machine, down to the cubin (Triton ships ptxas):
    what a GPU's first launch would build, without a GPU. Returns the compiled kernel's metadata."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    assert set(signature) - set(types) == set(constexprs), "a kernel argument is neither typed nor constexpr"
    compiled = T.triton_language()[0].compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                              target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"]
    return compiled.metadata


@needs_triton
def test_the_triton_kernels_compile_for_an_h100(monkeypatch):
    """Every kernel with the launch options the code uses, each variant it launches (bf16 and fp32 tensors; the
    MLP's forward and backward), compiled for sm_90 to a cubin within an H100's shared memory. The interpreter
    tests run their math; this runs the GPU compiler that the interpreter skips."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hopper_shared_bytes = 227 * 1024
    forward, backward = T.softcapped_ce_kernels()
    launch = dict(T.SOFTCAPPED_CE_LAUNCH)
    block = dict(BLOCK=launch.pop("BLOCK"))
    for dtype in ("bf16", "fp32"):
        scalars = dict(row_stride="i32", columns="i32", softcap="fp32")
        metadata = compile_for_sm90(forward, dict(raw=f"*{dtype}", targets="*i64", losses="*fp32", lse_out="*fp32",
                                                  **scalars), block, launch)
        assert metadata.shared <= hopper_shared_bytes
        metadata = compile_for_sm90(backward, dict(raw=f"*{dtype}", targets="*i64", lse_in="*fp32",
                                                   grad_losses="*fp32", grad=f"*{dtype}", **scalars), block, launch)
        assert metadata.shared <= hopper_shared_bytes
    launch = dict(T.LEAKY_RELU2_LAUNCH)
    options = dict(num_warps=launch.pop("num_warps"), num_stages=launch.pop("num_stages"))
    integers = ("m_size", "n_size", "k_size", "a_row_stride", "a_col_stride", "b_row_stride", "b_col_stride")
    for dtype, precision in (("bf16", "ieee"), ("fp32", "tf32")):
        types = dict(a=f"*{dtype}", b=f"*{dtype}", pre=f"*{dtype}", out=f"*{dtype}", slope="fp32",
                     **{name: "i32" for name in integers})
        for forward_pass in (True, False):
            metadata = compile_for_sm90(T.leaky_relu2_projection_kernel(), types,
                                        dict(FORWARD=forward_pass, PRECISION=precision, WIDEN=False, **launch), options)
            assert metadata.shared <= hopper_shared_bytes and metadata.num_warps == options["num_warps"]
