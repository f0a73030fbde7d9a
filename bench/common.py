"""Shared plumbing of the benchmarks: threads, peak memory, parameter counts, the matmul peak, and the
child-process protocol.

Every measurement runs in its own Python process (`run_child`), so its peak RSS is its own: the child
reports `ru_maxrss` of itself, and the peak of its descendants' memory (posttrain's reward worker) sampled from
/proc by `ChildMemory`, on one line starting with `BENCH_RESULT `, which the parent parses. (`ru_maxrss` of the
children is no use for the worker: a child started by fork + exec is charged the parent's pages at the fork.)
Nothing here measures anything by itself.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

THREADS = 2  # the benchmark machine has 2 cores; every child uses both, and only one child runs at a time
MARKER = "BENCH_RESULT "
ROOT = Path(__file__).resolve().parent.parent  # the repository: children run with it as their working directory

# What every child sees: the same thread count for OpenMP / MKL and torch, no hub access, no trackers.
CHILD_ENV = {
    "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "WANDB_DISABLED": "true", "WANDB_MODE": "disabled", "DISABLE_MLFLOW_INTEGRATION": "TRUE",
    "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error",
}


def share_prompts() -> bool | None:
    """posttrain's `batch.share_prompts` in the GRPO benchmarks (`bench.run --share-prompts off|auto|on`, in
    BENCH_SHARE_PROMPTS): False, None (auto: posttrain's default) or True."""
    return {"on": True, "off": False}.get(os.environ.get("BENCH_SHARE_PROMPTS", "auto"))


def device() -> str:
    """Where the measured work runs: BENCH_DEVICE, "cpu" unless `python -m bench.run --device cuda` set it.
    On "cuda" both libraries train in bf16 mixed precision (fp32 weights, bf16 autocast) and MFU is against the
    measured bf16 matmul peak."""
    return os.environ.get("BENCH_DEVICE", "cpu")


def sync() -> None:
    """Wait for the GPU's queued work under `device()` "cuda" (a timer read after it counts that work); no-op on CPU."""
    if device() == "cuda":
        import torch

        torch.cuda.synchronize()


def setup_threads() -> None:
    """Call first in every child: torch on THREADS threads (the env vars are set by `run_child` too), and the
    watch on its descendants' memory."""
    global _WATCH
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    _WATCH = ChildMemory()
    _WATCH.start()
    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)


def _status_mb(pid: str | int, field: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM) in MB; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def rss_now_mb() -> float:
    """Current resident set size of this process (VmRSS)."""
    return _status_mb("self", "VmRSS")


class ChildMemory(threading.Thread):
    """Samples, every `every` seconds, the summed peak RSS (VmHWM, counted from each process's exec) of this
    process's descendants; `peak_mb` is the largest sum seen. A daemon thread: it never keeps a child alive."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.peak_mb = every, 0.0

    @staticmethod
    def descendants(pid: int) -> list[str]:
        out, todo = [], [str(pid)]
        while todo:
            p = todo.pop()
            for task in Path(f"/proc/{p}/task").glob("*/children") if Path(f"/proc/{p}").exists() else []:
                try:
                    kids = task.read_text().split()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                out += kids
                todo += kids
        return out

    def run(self) -> None:
        me = os.getpid()
        while True:
            self.peak_mb = max(self.peak_mb, sum(_status_mb(p, "VmHWM") for p in self.descendants(me)))
            time.sleep(self.every)


_WATCH: ChildMemory | None = None


def peak_rss_mb() -> dict:
    """Peak resident set size of this process, and of its descendants when `setup_threads` started the watch."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"rss_mb": round(own, 1), "rss_children_mb": round(_WATCH.peak_mb, 1) if _WATCH else None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)  # this process's CUDA tensors
    return out


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: every parameter (tied embeddings counted once, as the LM
    head) minus an untied input embedding, which is a lookup. 2N of these is the forward cost of one token
    (attention's T^2 term left out), 6N forward + backward."""
    n = sum(p.numel() for p in model.parameters())
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return n if inp is out else n - inp.numel()


def on_device() -> dict:
    """posttrain's recipe keys for `device()`: none on the CPU (fp32 there by default); on a GPU bf16 mixed
    precision, what TRL's `bf16=True` runs (fp32 weights loaded from the fp32 checkpoint, bf16 autocast)."""
    return {"device": "cuda", "dtype": "bf16-mixed"} if device() == "cuda" else {}


def posttrain_defaults() -> dict:
    """The posttrain recipe keys under test that are recent (absent from older versions): `batch.pack` (SFT
    sequence packing), its `rows` mode, and the chunked LM head's `batch.logits_chunk*` key, with its default
    (left as it is)."""
    from posttrain.recipe import BatchConfig

    fields = BatchConfig.model_fields
    try:
        rows = BatchConfig(pack="rows").pack == "rows"
    except Exception:  # noqa: BLE001 (a version without it refuses the value)
        rows = False
    return {"has_pack": "pack" in fields, "pack_rows": rows,
            "logits_chunk": {n: f.default for n, f in fields.items() if n.startswith("logits_chunk")} or None}


def trl_checkpointing(trainer) -> bool:
    """Whether TRL's model runs with activation (gradient) checkpointing: off on both sides in these benchmarks."""
    model = trainer.model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def emit(result: dict) -> None:
    """Print the child's result as the one line the parent reads, with its peak memory added."""
    result.update(peak_rss_mb())
    print(MARKER + json.dumps(result), flush=True)


def run_child(module: str, *args, timeout: float = 900) -> dict:
    """Run `python -m module args` in a fresh process and return the dict it `emit`ted (raises with its stderr)."""
    env = dict(os.environ, **CHILD_ENV)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", module, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(MARKER):])
    result["process_s"] = round(time.perf_counter() - t0, 2)
    return result


def _onednn_product(a, b):
    """a @ b.T through oneDNN's fp32 matmul (posttrain's decode step uses it on the CPU); None on a GPU or where this
    torch has no such op. The same FLOPs as a @ b."""
    from posttrain.rollout.decode import onednn_linear_op

    op = onednn_linear_op() if a.device.type == "cpu" else None
    return None if op is None else (lambda: op(a, b, None, "none", [], ""))


def matmul_peaks(n: int = 2048, seconds: float = 3.0) -> dict[str, float]:
    """The matmul peak in GFLOP/s of each library that can compute the product: the best of repeated (n x n) @
    (n x n) products of random numbers, fp32 on THREADS CPU threads, or bf16 8192 x 8192 on the GPU (each product
    timed to its end by a synchronize). On the CPU both torch.mm (MKL here) and oneDNN's matmul, taking turns, as
    they differ by up to 20 % on the same machine (oneDNN is faster on the AMD EPYC of bench/README.md): the
    machine's peak is the larger."""
    import torch

    cuda = device() == "cuda"
    if cuda:
        n = 8192
    a, b = (torch.randn(n, n, device=device(), dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(2))
    products = {"torch.mm": lambda: a @ b}
    onednn = _onednn_product(a, b)
    if onednn is not None:
        products["onednn"] = onednn
    for product in products.values():
        for _ in range(3):
            product()  # warm-up: thread pool, page faults, cuBLAS handles, clocks
    sync()
    best = dict.fromkeys(products, float("inf"))
    end = time.perf_counter() + seconds * len(products)
    while time.perf_counter() < end:
        for name, product in products.items():
            t0 = time.perf_counter()
            product()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: 2 * n**3 / t / 1e9 for name, t in best.items()}


def step_intervals(ends: list[float], warmup: int) -> list[float]:
    """Seconds of each step after the first `warmup` ones, from the clock at each step's end; step i's interval
    runs from step i-1's end, so it includes whatever the trainer does between steps (data, logging)."""
    return [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:])] if warmup >= 1 else []
