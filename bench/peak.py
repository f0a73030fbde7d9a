"""The matmul peak of this machine (GFLOP/s), the denominator of every MFU: fp32 on the benchmarks' threads, or
bf16 on the GPU under `--device cuda`.

Best time of a (2048 x 2048) @ (2048 x 2048) product (8192 in bf16 on a GPU) repeated for a few seconds, in its
own process on common.THREADS threads, like every measurement; on the CPU through torch.mm and through oneDNN's
matmul, and the peak is the faster's. Prints one BENCH_RESULT line.
"""
from bench.common import THREADS, device, emit, matmul_peaks, setup_threads

if __name__ == "__main__":
    setup_threads()
    by_library = matmul_peaks()
    emit({"gflops": max(by_library.values()), "by_library": {k: round(v, 1) for k, v in by_library.items()},
          "threads": THREADS, "device": device()})
