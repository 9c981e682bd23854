"""Native kernels against their pure-PyTorch references and the physical floor measured in the same run.

    python benchmarks/kernels.py [--device cpu|cuda] [--repeats R] [--quick] [--only KERNEL[,KERNEL...]]
    python benchmarks/kernels.py --smoke     # every kernel on tiny shapes, memory probes included, prints only

For each kernel and shape: reference and native time (median of interleaved repeats, each timed call after an
untimed one of the same function, so that each finds its own data in cache), speedup, achieved rate,
the floor (fisher_linear: a torch GEMM of equal FLOPs; the bias: a torch sum that reads the same bytes; the
embedding: index_add_ of the same rows into the same table) and native time as a multiple of it, and the peak extra
memory of one call measured in a fresh process.
On CUDA the device-to-device copy bandwidth is measured in the same run, timings use device events. Writes
benchmarks/results/kernels_cpu.json and .md on the CPU, benchmarks/results/<gpu name>.json and .md on a GPU.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from decomp import ops, reference  # noqa: E402

# (N, T, in, out, padded[, dtype]): padded means each example's second half is padding (lengths = T // 2); dtype of
# A and G, float32 unless given (the bfloat16 row's floor is a bfloat16 GEMM).
LINEAR_SHAPES = [(32, 1, 384, 1536, False), (32, 16, 384, 1536, False), (32, 128, 384, 1536, False),
                 (16, 128, 768, 3072, False), (32, 128, 384, 1536, True)]
BF16_LINEAR_SHAPES = [(32, 128, 384, 1536, False, "bfloat16")]
EMBEDDING_SHAPES = [(32, 48, 30522, 384), (32, 128, 30522, 384)]  # (N, T, vocabulary, dim): MiniLM's table
DENSE_SHAPES = [(32, 1 << 20, 1024), (32, 1 << 20, 4096)]  # (N, p, k)
# (N, T, in, out, k_out, k_in, padded)
SKETCH_LINEAR_SHAPES = [(32, 48, 384, 1536, 16, 16, False), (32, 48, 1536, 384, 16, 16, False),
                        (32, 48, 384, 1536, 16, 16, True), (32, 48, 384, 1536, 8, 8, True)]
COUNT_SHAPES = [(32, 48, 384, 1536, 4096), (32, 48, 1536, 384, 4096)]  # (N, T, in, out, k)
DENSE_CHUNK = 1 << 14
# --smoke: one tiny shape per kernel (and the padded linear case), every code path in seconds
SMOKE_PLAN = [("fisher_linear", (4, 3, 16, 24, False)), ("fisher_linear", (4, 6, 16, 24, True)),
              ("fisher_linear", (4, 5, 16, 24, False, "bfloat16")),
              ("fisher_linear_bias", (4, 1, 16, 24, False)), ("fisher_linear_bias", (4, 6, 16, 24, True)),
              ("fisher_embedding", (4, 6, 50, 8)), ("sketch_dense", (4, 1 << 15, 64)),
              ("sketch_linear", (4, 6, 16, 24, 4, 4, True)), ("count_sketch_linear", (4, 6, 16, 24, 64))]


def rademacher_from_torch(rows, cols, generator):
    """The plain-PyTorch way to a +-1 projection block: torch's own generator (not our hash), on the generator's
    device, so that a GPU baseline never copies projections from the host."""
    signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8, device=generator.device)
    return signs.float().mul_(2).sub_(1).mul_(rows ** -0.5)


def linear_dtype(shape) -> torch.dtype:
    return getattr(torch, shape[5]) if len(shape) > 5 else torch.float32


def linear_inputs(shape, device):
    N, T, fin, fout, padded = shape[:5]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, T, fin, generator=g).to(device, linear_dtype(shape))
    G = torch.randn(N, T, fout, generator=g).to(device, linear_dtype(shape))
    lengths = torch.full((N,), T // 2 if padded else T, dtype=torch.int64, device=device)
    return A, G, lengths


def embedding_inputs(shape, device):
    N, T, vocabulary, dim = shape
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocabulary, (N, T), generator=g).to(device)
    ids[:, : T // 4] = ids[:, :1]  # repeated tokens, as in real text
    return ids, torch.randn(N, T, dim, generator=g).to(device)


def sketch_calls(kernel, shape, device):
    """Sketches: the baseline is the best plain-PyTorch formulation with torch's generator for the projection."""
    g = torch.Generator().manual_seed(0)
    if kernel == "sketch_dense":
        N, p, k = shape
        X = torch.randn(N, p, generator=g).to(device)
        W = torch.randn(k, DENSE_CHUNK, generator=g).to(device)

        def baseline():
            out = torch.zeros(N, k, device=device)
            gen = torch.Generator(device=device).manual_seed(1)
            for start in range(0, p, DENSE_CHUNK):
                S = rademacher_from_torch(k, DENSE_CHUNK, gen)
                out.addmm_(X[:, start:start + DENSE_CHUNK], S.T)
            return out

        def floor():
            out = torch.zeros(N, k, device=device)
            for start in range(0, p, DENSE_CHUNK):
                out.addmm_(X[:, start:start + DENSE_CHUNK], W.T)
            return out

        return baseline, lambda: ops.sketch_dense(X, k=k, seed=0), floor, (2 * N * p * k, "GFLOP/s")
    if kernel == "sketch_linear":
        N, T, fin, fout, k_out, k_in, padded = shape
        A, G = torch.randn(N, T, fin, generator=g).to(device), torch.randn(N, T, fout, generator=g).to(device)
        lengths = torch.full((N,), T // 2 if padded else T, dtype=torch.int64, device=device)
        tokens = int(lengths.sum())
        flops = 2 * tokens * (fout * k_out + fin * k_in + k_out * k_in)
        left, right = torch.randn(tokens, fout + fin, generator=g), torch.randn(fout + fin, k_out, generator=g)
        keep = (torch.arange(T, device=device)[None, :] < lengths[:, None])[..., None].float()

        def baseline():   # padding masked on the small projected side, as a torch user would
            S_out = rademacher_from_torch(k_out, fout, torch.Generator(device=device).manual_seed(1))
            S_in = rademacher_from_torch(k_in, fin, torch.Generator(device=device).manual_seed(2))
            projected_g = G @ S_out.T
            if padded:
                projected_g.mul_(keep)
            return torch.bmm(projected_g.transpose(1, 2), A @ S_in.T).reshape(N, -1)

        left, right = left.to(device), right.to(device)
        return (baseline, lambda: ops.sketch_linear(A, G, k_out=k_out, k_in=k_in, seed=0,
                                                    lengths=lengths if padded else None),
                lambda: left @ right, (flops, "GFLOP/s"))
    N, T, fin, fout, k = shape
    A, G = torch.randn(N, T, fin, generator=g).to(device), torch.randn(N, T, fout, generator=g).to(device)
    counts = torch.randn(N, T, k, generator=g).to(device)
    return (lambda: reference.count_sketch_linear(A, G, k=k, seed=0),
            lambda: ops.count_sketch_linear(A, G, k=k, seed=0),
            lambda: reference.tensor_sketch_from_counts(counts, counts, k),
            ((A.numel() + G.numel()) * 4, "GB/s"))


def calls(kernel, shape, device):
    """(reference call, native call, floor call, work: (flops or bytes, unit)) for one kernel and shape."""
    if kernel in ("sketch_dense", "sketch_linear", "count_sketch_linear"):
        return sketch_calls(kernel, shape, device)
    if kernel == "fisher_embedding":
        ids, G = embedding_inputs(shape, device)
        out = torch.zeros(shape[2], shape[3], device=device)
        rows, at = G.reshape(-1, shape[3]), ids.reshape(-1)
        # the floor adds the same rows into the same table: reading G is not the bound, the read-modify-write of
        # a row of a [V, dim] table per token (scattered over tens of MB) is
        return (lambda: reference.fisher_embedding(ids, G, shape[2], out=out),
                lambda: ops.fisher_embedding(ids, G, shape[2], out=out),
                lambda: out.index_add_(0, at, rows), (G.numel() * 4, "GB/s"))
    A, G, lengths = linear_inputs(shape, device)
    N, T, fin, fout, padded = shape[:5]
    lengths_arg = lengths if padded else None
    tokens = int(lengths.sum())
    if kernel == "fisher_linear_bias":
        out = torch.zeros(fout, device=device)
        flat = G[:, : tokens // N].reshape(-1)
        return (lambda: reference.fisher_linear_bias(G, lengths=lengths_arg, out=out),
                lambda: ops.fisher_linear_bias(G, lengths=lengths_arg, out=out),
                lambda: flat.sum(), (tokens * fout * 4, "GB/s"))
    out = torch.zeros(fout, fin, device=device)
    left = torch.randn(fout, tokens, device=device).to(linear_dtype(shape))
    right = torch.randn(tokens, fin, device=device).to(linear_dtype(shape))
    if T == 1:
        A, G = A[:, 0], G[:, 0]
    return (lambda: reference.fisher_linear(A, G, lengths=lengths_arg, out=out),
            lambda: ops.fisher_linear(A, G, lengths=lengths_arg, out=out),
            lambda: torch.mm(left, right), (2 * tokens * fin * fout, "GFLOP/s"))


def memory_probe(kernel, implementation, shape):
    device = torch.device("cpu")
    # A first call on a tiny input pays the one-time costs (operator registration, thread pools, BLAS buffers)
    # that are not the kernel's working memory.
    tiny = (2, 3, 5, 7) if kernel == "fisher_embedding" else (2, 3, 5, 7, False)
    for warm in calls(kernel, tiny, device)[:2]:
        warm()
    reference_call, native_call, _, _ = calls(kernel, shape, device)
    call = native_call if implementation == "native" else reference_call
    before = h.resident_peak_reset()
    call()
    print(h.resident_peak() - before)


def shape_entry(text: str):
    """One entry of a shape passed to a memory probe: a Python literal (an int, True, False) or a dtype name."""
    try:
        return ast.literal_eval(text)
    except ValueError:
        return text


def shape_label(kernel, shape):
    if kernel == "sketch_dense":
        return f"N={shape[0]} p=2^{shape[1].bit_length() - 1} k={shape[2]}"
    if kernel == "sketch_linear":
        return (f"N={shape[0]} T={shape[1]} {shape[2]}->{shape[3]} k={shape[4]}x{shape[5]}"
                + (" half padded" if shape[6] else ""))
    if kernel == "count_sketch_linear":
        return f"N={shape[0]} T={shape[1]} {shape[2]}->{shape[3]} k={shape[4]}"
    if kernel == "fisher_embedding":
        N, T, vocabulary, dim = shape
        return f"N={N} T={T} V={vocabulary} dim={dim}"
    N, T, fin, fout, padded = shape[:5]
    return (f"N={N} T={T} {fin}->{fout}" + (" half padded" if padded else "")
            + (f" {shape[5]}" if len(shape) > 5 else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no memory probes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, memory probes, print only")
    parser.add_argument("--only", help="comma-separated kernels to run (e.g. fisher_linear_bias,count_sketch_linear); "
                        "a partial run prints its table and saves nothing")
    parser.add_argument("--memory-probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        kernel, implementation, *shape = args.memory_probe
        return memory_probe(kernel, implementation, tuple(map(shape_entry, shape)))

    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    plan = [("fisher_linear", s) for s in LINEAR_SHAPES + BF16_LINEAR_SHAPES]
    plan += [("fisher_linear_bias", s) for s in LINEAR_SHAPES]
    plan += [("fisher_embedding", s) for s in EMBEDDING_SHAPES]
    plan += [("sketch_dense", s) for s in DENSE_SHAPES] + [("sketch_linear", s) for s in SKETCH_LINEAR_SHAPES]
    plan += [("count_sketch_linear", s) for s in COUNT_SHAPES]
    if args.quick:
        plan = [(kernel, shape) for kernel, shape in plan if kernel != "sketch_dense" or shape[2] == 1024]
    if args.smoke:
        plan, repeats = SMOKE_PLAN, 1
    if args.only:
        chosen = set(args.only.split(","))
        unknown = chosen - {kernel for kernel, _ in plan}
        if unknown:
            parser.error(f"--only: unknown kernel(s) {sorted(unknown)}; choose from "
                         f"{sorted({kernel for kernel, _ in plan})}")
        plan = [(kernel, shape) for kernel, shape in plan if kernel in chosen]
    rows = []
    for kernel, shape in plan:
        reference_call, native_call, floor_call, (work, unit) = calls(kernel, shape, device)
        slow = kernel == "sketch_dense"  # seconds per call: fewer repeats
        times = h.time_interleaved({"reference": reference_call, "native": native_call, "floor": floor_call},
                                   device, min(repeats, 3) if slow else repeats, warmup=1 if slow else 2,
                                   settle=not slow)
        row = {
            "kernel": kernel, "shape": shape_label(kernel, shape),
            "reference ms": times["reference"], "native ms": times["native"],
            "speedup": times["reference"] / times["native"],
            "rate": work / times["native"] * 1e-6, "unit": unit,  # work per ms -> giga per s
            "floor ms": times["floor"], "native / floor": times["native"] / times["floor"],
        }
        if device.type == "cpu" and not args.quick and kernel.startswith("fisher"):   # --smoke included
            probe = [kernel, "native", *shape]
            row["native peak extra MiB"] = h.peak_extra_bytes_in_subprocess(Path(__file__), probe) / 2**20
            probe[1] = "reference"
            row["reference peak extra MiB"] = h.peak_extra_bytes_in_subprocess(Path(__file__), probe) / 2**20
        rows.append(row)
        print(" | ".join(f"{k}={h._cell(v)}" for k, v in row.items()), flush=True)

    info = h.machine()
    copy_note = ""
    if device.type == "cuda":
        source = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        copy_ms = h.time_interleaved({"copy": lambda: target.copy_(source)}, device, repeats)["copy"]
        copy_bandwidth = 2 * source.numel() / copy_ms * 1e-6  # read + write, GB/s
        info["copy GB/s"] = copy_bandwidth
        copy_note = (f"Device-to-device copy bandwidth in this run: {copy_bandwidth:.0f} GB/s (256 MiB, read + "
                     f"write); the memory-bound kernels' rates compare with it.\n\n")
    columns = ["kernel", "shape", "reference ms", "native ms", "speedup", "rate", "unit", "floor ms",
               "native / floor", "native peak extra MiB", "reference peak extra MiB"]
    text = (f"# Kernel benchmark ({device.type})\n\nMachine: {info['cpu']}, {info['cores']} cores, "
            f"{info['torch_threads']} torch threads, GPU: {info['gpu'] or 'none'}; torch {info['torch']}.\n"
            f"Median of {repeats} interleaved repeats (3 for sketch_dense), each timed call right after an untimed "
            f"call of the same function (sketch_dense: seconds a call, not needed), so that no candidate finds the "
            f"data of the one timed before it in cache. Reference: the pure-PyTorch function of "
            f"decomp.reference; for sketch_dense and sketch_linear the best plain-PyTorch way with torch's own "
            f"generator for S (chunks of {DENSE_CHUNK} columns for dense). Floor: fisher_linear, sketch_dense, "
            f"sketch_linear - a torch GEMM of equal FLOPs in the inputs' dtype (valid tokens only; for dense, X "
            f"times a stored S); "
            f"bias - a torch sum reading the same bytes; embedding - index_add_ of the same rows into the same "
            f"[V, dim] table (the bound is the read-modify-write of a table row per token, not reading G); "
            f"count_sketch_linear - its FFT part alone. "
            f"Rate: GFLOP/s, or GB/s of input read. Peak extra memory (Fisher kernels): resident bytes of one call "
            f"beyond those before it, in a fresh process after a warm-up call on a tiny input.\n\n"
            + copy_note + h.markdown_table(rows, columns))
    if not (args.quick or args.smoke or args.only):
        name = "kernels_cpu" if device.type == "cpu" else h.slug(info["gpu"])
        h.save(name, {"machine": info, "repeats": repeats, "rows": rows}, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
