"""The fused Triton kernels against the unfused math they replace, run on the CPU in Triton's interpreter
(TRITON_INTERPRET=1). Without Triton installed these tests skip, saying so; CI installs it."""

import importlib.util
import re
import sys

import pytest
import torch

import train_gpt as T
from conftest import REPO, run_script, tiny_env
from fused_kernel_worker import INTERPRETER_CANNOT

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (pip install -r requirements-optional.txt)")
WORKER = REPO / "tests" / "fused_kernel_worker.py"


def run_worker(tmp_path, *args):
    """The worker in Triton's interpreter; a skip, with the worker's reason, where the interpreter itself cannot run
    the kernels' loops (its exit status INTERPRETER_CANNOT)."""
    result = run_script([sys.executable, str(WORKER), *args], {"TRITON_INTERPRET": "1"}, tmp_path, timeout=300)
    if result.returncode == INTERPRETER_CANNOT:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@needs_triton
def test_the_fused_kernels_equal_the_unfused_math_in_tritons_interpreter(tmp_path):
    """tests/fused_kernel_worker.py, in a process of its own that sets TRITON_INTERPRET=1 before importing Triton:
    the kernel's losses and gradients (fp32 and bf16, logits beyond the softcap) and a model's loss and gradients."""
    result = run_worker(tmp_path)
    assert "fused kernels: equal to the unfused math" in result.stdout


@needs_triton
@pytest.mark.cuda_path  # a whole run: CI's second step
def test_the_packed_file_trains_through_the_fused_kernel(sample, tmp_path):
    """A packed file compiles its kernels from its own source (it puts it in linecache): a short run through the
    kernel in Triton's interpreter. Its math against the unfused one: the worker's checks above."""
    run_worker(tmp_path, "--probe")
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


TRITON_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
HOPPER_SHARED_BYTES = 227 * 1024


class LaunchRecorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def as_launched(kernel, args, kwargs):
    """An ASTSource of `kernel` specialized as Triton's JIT specializes a launch with these values: an int equal to
    1 becomes the constant 1, and an int divisible by 16, or a tensor whose address is, is marked so
    (tt.divisibility), which is what lets the compiler vectorize a load and stream it asynchronously. Without
    this the compiler builds another kernel than the one a GPU runs. Returns (source, options)."""
    from triton.compiler import ASTSource
    constants = {name: value for name, value in kwargs.items() if name not in LAUNCH_OPTIONS}
    signature, attrs = dict.fromkeys(constants, "constexpr"), {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int) and value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if isinstance(value, int) else f"*{TRITON_TYPES[value.dtype]}"
            if (value if isinstance(value, int) else value.data_ptr()) % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    assert set(signature) == set(kernel.arg_names), "a kernel argument is neither passed nor a launch constant"
    options = {name: kwargs[name] for name in LAUNCH_OPTIONS if name in kwargs}
    return ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs), options


def compile_for_sm90(kernel, args, kwargs):
    """Triton's ahead-of-time compile for an H100 (sm_90) on this machine, down to the cubin (Triton ships ptxas):
    what a GPU's first launch with these arguments would build, without a GPU."""
    from triton.backends.compiler import GPUTarget
    source, options = as_launched(kernel, args, kwargs)
    compiled = T.triton_language()[0].compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"]
    return compiled


@needs_triton
def test_the_triton_kernels_compile_for_an_h100_as_the_code_launches_them(monkeypatch, request):
    """Every launch the fused ops make, in bf16 and fp32 (the MLP's forward and backward, the cross-entropy's
    forward and backward), recorded at the default stack's sizes (width 512, MLP 4x, an SP8192 head) and compiled
    for sm_90 to a cubin, within an H100's shared memory. In bf16 the MLP's tiles stream through shared memory
    asynchronously (cp.async, the pipeline's stages) into Hopper's warpgroup tensor-core instructions (wgmma), and
    the cross-entropy reads (and writes) a row 16 bytes a thread at a time. FP fusion is on, as the records' kernels
    have it, under Triton 3.10's default (off) too. The interpreter tests run the kernels' math; this runs the GPU
    compiler that the interpreter skips."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")  # Triton 3.10's default
    matmul, tf32 = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    matmul.allow_tf32 = True  # as a CUDA run sets it. Not by monkeypatch: its undo deletes what is not in __dict__
    request.addfinalizer(lambda: setattr(matmul, "allow_tf32", tf32))
    mlp = LaunchRecorder(T.leaky_relu2_projection_kernel())
    ce = [LaunchRecorder(kernel) for kernel in T.softcapped_ce_kernels()]
    monkeypatch.setattr(T, "leaky_relu2_projection_kernel", lambda: mlp)
    monkeypatch.setattr(T, "softcapped_ce_kernels", lambda: ce)
    tokens, dim, vocab = 64, 512, 8192
    for dtype in (torch.bfloat16, torch.float32):
        x, up, down = (torch.zeros(*shape, dtype=dtype, requires_grad=True)
                       for shape in ((tokens, dim), (4 * dim, dim), (dim, 4 * dim)))
        T.fused_leaky_relu2_mlp()(x, up, down, 0.5).sum().backward()
        raw = torch.zeros(tokens, vocab, dtype=dtype, requires_grad=True)
        T.fused_softcapped_ce()(raw, torch.zeros(tokens, dtype=torch.long), 30.0).sum().backward()
    assert [len(recorder.launches) for recorder in (mlp, *ce)] == [4, 2, 2]  # forward and backward, two dtypes
    for recorder in (mlp, *ce):
        for args, kwargs in recorder.launches:
            compiled = compile_for_sm90(recorder.kernel, args, kwargs)
            assert compiled.metadata.shared <= HOPPER_SHARED_BYTES
            assert compiled.metadata.num_warps == kwargs.get("num_warps", 4)
            assert compiled.metadata.enable_fp_fusion, recorder.kernel
            ptx = compiled.asm["ptx"]
            if recorder is mlp and args[0].dtype == torch.bfloat16:
                tensor_cores, pipelined = "wgmma.mma_async" in ptx, re.search(r"cp\.async\.(ca|cg)", ptx) is not None
                assert tensor_cores and pipelined, f"wgmma: {tensor_cores}, cp.async: {pipelined}, launch: {kwargs}"
            if recorder is not mlp:  # a pass over the logits in 16-byte loads (and, backward, stores) a thread
                assert "ld.global.v4" in ptx and (recorder is ce[0] or "st.global.v4" in ptx), recorder.kernel
