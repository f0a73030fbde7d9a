"""The fp32 matmul peak of this machine on the benchmarks' threads (GFLOP/s), the denominator of every MFU.

Best time of a (2048 x 2048) @ (2048 x 2048) product repeated for a few seconds, in its own process on
common.THREADS threads, like every measurement. Prints one BENCH_RESULT line.
"""
from bench.common import THREADS, emit, matmul_peak_gflops, setup_threads

if __name__ == "__main__":
    setup_threads()
    emit({"gflops": matmul_peak_gflops(), "threads": THREADS})
