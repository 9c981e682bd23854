"""Native kernels against their pure-PyTorch references and the physical floor measured in the same run.

    python benchmarks/kernels.py [--device cpu|cuda] [--repeats R] [--quick]

For each kernel and shape: reference and native time (median of interleaved repeats), speedup, achieved rate,
the floor (fisher_linear: a torch GEMM of equal FLOPs; the memory-bound kernels: a torch sum that reads the
same bytes) and native time as a multiple of it, and the peak extra memory of one call measured in a fresh process.
Writes benchmarks/results/kernels_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from decomp import ops, reference  # noqa: E402

# (N, T, in, out, padded): padded means each example's second half is padding (lengths = T // 2).
LINEAR_SHAPES = [(32, 1, 384, 1536, False), (32, 16, 384, 1536, False), (32, 128, 384, 1536, False),
                 (16, 128, 768, 3072, False), (32, 128, 384, 1536, True)]
EMBEDDING_SHAPES = [(32, 48, 30522, 384), (32, 128, 30522, 384)]  # (N, T, vocabulary, dim): MiniLM's table


def linear_inputs(shape, device):
    N, T, fin, fout, padded = shape
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, T, fin, generator=g).to(device)
    G = torch.randn(N, T, fout, generator=g).to(device)
    lengths = torch.full((N,), T // 2 if padded else T, dtype=torch.int64, device=device)
    return A, G, lengths


def embedding_inputs(shape, device):
    N, T, vocabulary, dim = shape
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocabulary, (N, T), generator=g).to(device)
    ids[:, : T // 4] = ids[:, :1]  # repeated tokens, as in real text
    return ids, torch.randn(N, T, dim, generator=g).to(device)


def calls(kernel, shape, device):
    """(reference call, native call, floor call, work: (flops or bytes, unit)) for one kernel and shape."""
    if kernel == "fisher_embedding":
        ids, G = embedding_inputs(shape, device)
        out = torch.zeros(shape[2], shape[3], device=device)
        flat = G.reshape(-1)
        return (lambda: reference.fisher_embedding(ids, G, shape[2], out=out),
                lambda: ops.fisher_embedding(ids, G, shape[2], out=out),
                lambda: flat.sum(), (G.numel() * 4, "GB/s"))
    A, G, lengths = linear_inputs(shape, device)
    N, T, fin, fout, padded = shape
    lengths_arg = lengths if padded else None
    tokens = int(lengths.sum())
    if kernel == "fisher_linear_bias":
        out = torch.zeros(fout, device=device)
        flat = G[:, : tokens // N].reshape(-1)
        return (lambda: reference.fisher_linear_bias(G, lengths=lengths_arg, out=out),
                lambda: ops.fisher_linear_bias(G, lengths=lengths_arg, out=out),
                lambda: flat.sum(), (tokens * fout * 4, "GB/s"))
    out = torch.zeros(fout, fin, device=device)
    left = torch.randn(fout, tokens, device=device)
    right = torch.randn(tokens, fin, device=device)
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


def shape_label(kernel, shape):
    if kernel == "fisher_embedding":
        N, T, vocabulary, dim = shape
        return f"N={N} T={T} V={vocabulary} dim={dim}"
    N, T, fin, fout, padded = shape
    return f"N={N} T={T} {fin}->{fout}" + (" half padded" if padded else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no memory probes")
    parser.add_argument("--memory-probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        kernel, implementation, *shape = args.memory_probe
        return memory_probe(kernel, implementation, tuple(eval(x) for x in shape))

    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    plan = [("fisher_linear", s) for s in LINEAR_SHAPES] + [("fisher_linear_bias", s) for s in LINEAR_SHAPES]
    plan += [("fisher_embedding", s) for s in EMBEDDING_SHAPES]
    rows = []
    for kernel, shape in plan:
        reference_call, native_call, floor_call, (work, unit) = calls(kernel, shape, device)
        times = h.time_interleaved({"reference": reference_call, "native": native_call, "floor": floor_call},
                                   device, repeats)
        row = {
            "kernel": kernel, "shape": shape_label(kernel, shape),
            "reference ms": times["reference"], "native ms": times["native"],
            "speedup": times["reference"] / times["native"],
            "rate": work / times["native"] * 1e-6,  # per ms -> giga per s "unit": unit,
            "floor ms": times["floor"], "native / floor": times["native"] / times["floor"],
        }
        if device.type == "cpu" and not args.quick:
            probe = [kernel, "native", *shape]
            row["native peak extra MiB"] = h.peak_extra_bytes_in_subprocess(Path(__file__), probe) / 2**20
            probe[1] = "reference"
            row["reference peak extra MiB"] = h.peak_extra_bytes_in_subprocess(Path(__file__), probe) / 2**20
        rows.append(row)
        print(" | ".join(f"{k}={h._cell(v)}" for k, v in row.items()), flush=True)

    columns = ["kernel", "shape", "reference ms", "native ms", "speedup", "rate", "unit", "floor ms",
               "native / floor", "native peak extra MiB", "reference peak extra MiB"]
    info = h.machine()
    text = (f"# Kernel benchmark ({device.type})\n\nMachine: {info['cpu']}, {info['cores']} cores, "
            f"{info['torch_threads']} torch threads, GPU: {info['gpu'] or 'none'}; torch {info['torch']}.\n"
            f"Median of {repeats} interleaved repeats. Floor: fisher_linear - a torch GEMM of equal FLOPs "
            f"(valid tokens only); bias and embedding - a torch sum reading the same bytes. Rate: GFLOP/s or GB/s "
            f"read. Peak extra memory: resident bytes of one call beyond those before it, in a fresh process.\n\n"
            + h.markdown_table(rows, columns))
    if not args.quick:
        h.save(f"kernels_{device.type}", {"machine": info, "repeats": repeats, "rows": rows}, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
