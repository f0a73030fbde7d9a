"""The matmul peak of this machine (GFLOP/s), the denominator of every MFU: fp32 on the benchmarks' threads, or
bf16 on the GPU under `--device cuda`.

Best time of a (2048 x 2048) @ (2048 x 2048) product (8192 in bf16 on a GPU) repeated for a few seconds, in its
own process on common.THREADS threads, like every measurement. Prints one BENCH_RESULT line.
"""
from bench.common import THREADS, device, emit, matmul_peak_gflops, setup_threads

if __name__ == "__main__":
    setup_threads()
    emit({"gflops": matmul_peak_gflops(), "threads": THREADS, "device": device()})
