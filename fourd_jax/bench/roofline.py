"""The machine's limits, measured in the same run as a benchmark, and a bench's fraction of them.

A speed-up against torch says nothing about how much faster the work could go. Each bench
therefore also measures, on the same machine and in the same process:

- `matmul_peak`: FLOP/s of one jitted matmul at the bench's own sizes (the compute roof);
- `stream_bandwidth`: bytes/s of a jitted small-batch matmul over a weight as large as the
  bench's decoder (the roof of weight-streaming decode, where every step reads every weight);

and reports its achieved FLOP/s or bytes/s as a fraction of them. The work counts are arithmetic
on the model's shapes (`fourd_jax.train.observe`), never timings, so the tests check them exactly.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Runs:
    """Wall times of repeated calls: the median and the spread."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def low(self) -> float:
        return min(self.times)

    @property
    def high(self) -> float:
        return max(self.times)

    def ms(self) -> str:
        """'median ms (low-high)'."""
        return f"{self.median * 1e3:.1f} ms ({self.spread_ms()})"

    def spread_ms(self) -> str:
        """'low-high' in ms."""
        return f"{self.low * 1e3:.1f}-{self.high * 1e3:.1f}"


def time_runs(fn: Callable[[], Any], repeats: int) -> Runs:
    """Wall times of `repeats` calls of fn (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Runs(tuple(times))


def matmul_flops(m: int, k: int, n: int) -> int:
    """Multiply-adds of an [m, k] @ [k, n] matmul, counted as 2 FLOPs each."""
    return 2 * m * k * n


def timed_matmul(m: int, k: int, n: int, repeats: int, dtype: Any = jnp.float32) -> tuple[Runs, int]:
    """(wall times, weight bytes) of a jitted [m, k] @ [k, n] on random operands, after a warm-up."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.standard_normal((m, k)), dtype)
    w = jnp.asarray(rs.standard_normal((k, n)), dtype)
    f = jax.jit(jnp.matmul)
    f(x, w).block_until_ready()
    return time_runs(lambda: f(x, w).block_until_ready(), repeats), w.nbytes


def matmul_peak(m: int, k: int, n: int, repeats: int = 7, dtype: Any = jnp.float32) -> tuple[float, Runs]:
    """(FLOP/s at the median, the runs) of a jitted [m, k] @ [k, n] matmul."""
    runs, _ = timed_matmul(m, k, n, repeats, dtype)
    return matmul_flops(m, k, n) / runs.median, runs


def stream_bandwidth(weight_bytes: int, rows: int, k: int, repeats: int = 7,
                     dtype: Any = jnp.float32) -> tuple[float, Runs]:
    """(bytes/s at the median, the runs) of a jitted [rows, k] @ [k, n] with the weight about
    `weight_bytes` large: what one decode step does to every decoder weight."""
    n = max(1, weight_bytes // (k * jnp.dtype(dtype).itemsize))
    runs, nbytes = timed_matmul(rows, k, n, repeats, dtype)
    return nbytes / runs.median, runs


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in a pytree."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def decoder_weight_bytes(params: Any) -> int:
    """Bytes of the weights one decode step reads whole: the decoder's layers and the LM head.
    Not the vision tower, and not the input embedding (a gather of one row per token), unless the
    LM head is that embedding (tied)."""
    lm = params["language_model"]
    embedding = tree_bytes(lm["embed_tokens"]) if "lm_head" in params else 0
    return tree_bytes({k: v for k, v in params.items() if k != "visual"}) - embedding


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fraction(achieved: float, limit: float) -> str:
    return f"{achieved / limit:.0%}"


DTYPES = ("float32", "bfloat16")  # what a bench may compute in


def checked_dtype(dtype: str) -> str:
    """`dtype` when a bench can compute in it, else one sentence naming the choices."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    return dtype


# Dense bf16 tensor-core FLOP/s from the makers' data sheets, by a part of jax's device_kind (the first
# that matches): the denominator of MFU. CPUs have no such figure; their benches use the measured peak.
DATASHEET_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def datasheet_peak(dtype: Any) -> float | None:
    """The data sheet's dense FLOP/s of jax's first device for `dtype` (bf16 only), or None."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return None
    kind = jax.devices()[0].device_kind
    return next((flops for part, flops in DATASHEET_BF16_FLOPS if part in kind), None)


def compute_roof(flops: float, jax_runs: Runs, torch_runs: Runs, shape: tuple[int, int, int],
                 what: str, dtype: Any = jnp.float32) -> tuple[dict[str, object], str]:
    """(result columns, a printed line) for a compute-bound bench: `flops` of work per call
    against the matmul peak measured now at `shape` (m, k, n) in `dtype`, and this process's peak
    memory; on an accelerator with a data-sheet peak, also each side's MFU against it."""
    peak, _ = matmul_peak(*shape, dtype=dtype)
    jax_s, torch_s = jax_runs.median, torch_runs.median
    rss = peak_rss_bytes()
    columns = {"GFLOP": round(flops / 1e9, 2), "jax GFLOP/s": round(flops / jax_s / 1e9, 1),
               "matmul peak GFLOP/s": round(peak / 1e9, 1), "jax of peak": fraction(flops / jax_s, peak),
               "torch of peak": fraction(flops / torch_s, peak), "peak RSS GiB": round(rss / 2**30, 2)}
    m, k, n = shape
    line = (f"roofline: {flops / 1e9:.2f} GFLOP per {what}; jax {columns['jax GFLOP/s']} GFLOP/s = "
            f"{columns['jax of peak']} and torch {columns['torch of peak']} of this machine's jitted {m}x{k} @ {k}x{n} "
            f"{jnp.dtype(dtype).name} matmul ({columns['matmul peak GFLOP/s']} GFLOP/s, measured now); peak host "
            f"memory {columns['peak RSS GiB']} GiB")
    sheet = datasheet_peak(dtype)
    if sheet:
        columns.update({"jax MFU": fraction(flops / jax_s, sheet), "torch MFU": fraction(flops / torch_s, sheet)})
        line += (f"; MFU against the data sheet's {sheet / 1e12:.0f} TFLOP/s: jax {columns['jax MFU']}, torch "
                 f"{columns['torch MFU']}")
    return columns, line


def torch_device() -> Any:
    """The device the torch baseline runs on: the GPU when torch sees one (as jax then does), else the CPU."""
    import torch  # the baseline's framework; only the benches import it

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
