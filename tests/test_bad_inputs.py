"""A census of bad inputs: each is the documented exception, whose message names the argument and the value given,
and leaves every file as it was. Then property tests of every kernel against its reference over random shapes
(0, 1, odd), strides, dtypes and padding, and NaN in, NaN out."""

import functools
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import decomp
from decomp import ops, reference
from decomp.gradients.store import DamagedStoreError
from conftest import assert_within_rounding
from models import VOCAB, padded_batch, tiny
from test_fisher_ops import make_factor, make_lengths, poison_padding, rounding_steps
from test_sketch_ops import per_example_gradients

SMALL = dict(k_out=4, k_in=4, k_vector=64, progress=False)
LENGTHS = [5, 3, 7, 1]


@functools.lru_cache(maxsize=None)
def model(kind: str, seed: int = 0):
    return tiny(kind, seed)


def batch(kind="bert", **changes):
    b = padded_batch(kind, LENGTHS)
    for key, edit in changes.items():
        b[key] = edit(b[key].clone())
    return b


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes' digest (directories as None): what 'unchanged' means."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# --- shared files, built once per module and copied into each case's tmp_path ----------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    data = [padded_batch("bert", LENGTHS)]
    decomp.sketch_gradients(model("bert"), data, store=root / "store", **SMALL)
    decomp.compute_fisher(model("bert"), data, progress=False).save(root / "fisher.safetensors")
    features = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    decomp.pca(features, 3).save(root / "components.safetensors")
    return root


def setup_files(assets: Path, tmp_path: Path) -> None:
    shutil.copytree(assets / "store", tmp_path / "store")
    for name in ("fisher.safetensors", "components.safetensors"):
        shutil.copy(assets / name, tmp_path / name)
    (tmp_path / "garbage.bin").write_bytes(b"not a safetensors file at all" * 20)
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")


def rewrite_fisher(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    name = sorted(tensors)[0]
    edit(tensors[name])
    save_file(tensors, str(path), metadata=metadata)


def nan_fisher(tmp):
    rewrite_fisher(tmp / "fisher.safetensors", lambda t: t.view(-1).__setitem__(0, float("nan")))
    return decomp.Fisher.load(tmp / "fisher.safetensors")


def negative_fisher(tmp):
    rewrite_fisher(tmp / "fisher.safetensors", lambda t: t.view(-1).__setitem__(0, -1.0))
    return decomp.Fisher.load(tmp / "fisher.safetensors")


def truncated(path: Path, keep: int):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


def truncated_fisher(tmp):
    truncated(tmp / "fisher.safetensors", -7)
    return decomp.Fisher.load(tmp / "fisher.safetensors")


def plain_safetensors(tmp):
    return decomp.Fisher.load(tmp / "plain.safetensors")


def row_bytes(store: Path) -> int:
    return 4 * json.loads((store / "meta.json").read_text())["dim"]


def damaged_store(tmp, how):
    store = tmp / "store"
    if how == "meta":
        (store / "meta.json").write_text('{"format": "decomp.sketch/2", "rows": ')
    elif how == "truncated":
        truncated(store / "features.f32", row_bytes(store) * 2 + 10)   # two whole rows and a part
    elif how == "flipped":
        raw = bytearray((store / "features.f32").read_bytes())
        raw[row_bytes(store) * 2 + 3] ^= 0x40   # a bit of row 2
        (store / "features.f32").write_bytes(bytes(raw))
    elif how == "rows":
        meta = json.loads((store / "meta.json").read_text())
        meta["rows"] = 9
        (store / "meta.json").write_text(json.dumps(meta))
    elif how == "progress":
        meta = json.loads((store / "meta.json").read_text())
        meta["complete"] = False
        (store / "meta.json").write_text(json.dumps(meta))
        (store / "progress-0.json").write_text("{not json")
    return store


def resume(tmp, **changes):
    kind = changes.pop("kind", "bert")
    data = changes.pop("data", [padded_batch("bert", LENGTHS)])
    return decomp.sketch_gradients(model(kind, changes.pop("model_seed", 0)), data, store=tmp / "store",
                                   **{**SMALL, **changes})


def unfinished(tmp):
    """The finished store turned back into a run killed after its batch (its rows committed)."""
    meta = json.loads((tmp / "store" / "meta.json").read_text())
    meta.update(complete=False, rows=0)
    (tmp / "store" / "meta.json").write_text(json.dumps(meta))
    return tmp / "store"


FEATURES = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
A, G = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
IDS = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(0))
X = torch.randn(3, 10)
NAN_ROW = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [2.0, 0.0]])
FOUR = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))   # centred: rank 3

# (id, call(tmp_path), exception type, strings the message must hold: the argument and the value)
CASES = [
    # ---- kernels: ranks, dtypes, devices, sizes, value ranges
    ("fisher-float64", lambda t: ops.fisher_linear(A.double(), G.double()), ValueError, ["G", "float64"]),
    ("fisher-rank4", lambda t: ops.fisher_linear(A[..., None], G), ValueError, ["A", "[3, 4, 5, 1]"]),
    ("fisher-N-mismatch", lambda t: ops.fisher_linear(A, G[:2]), ValueError, ["A and G", "[2, 4, 6]"]),
    ("fisher-dtype-mismatch", lambda t: ops.fisher_linear(A.bfloat16(), G), ValueError, ["A", "bfloat16"]),
    ("fisher-device", lambda t: ops.fisher_linear(A.to("meta"), G), ValueError, ["A", "meta", "same device"]),
    ("fisher-str", lambda t: ops.fisher_linear("A", G), ValueError, ["A", "str"]),
    ("fisher-lengths-beyond-T", lambda t: ops.fisher_linear(A, G, lengths=torch.tensor([1, 5, 2])), ValueError,
     ["lengths", "T=4", "5"]),
    ("fisher-lengths-negative", lambda t: ops.fisher_linear(A, G, lengths=torch.tensor([1, -1, 2])), ValueError,
     ["lengths", "-1"]),
    ("fisher-lengths-float", lambda t: ops.fisher_linear(A, G, lengths=torch.tensor([1.0, 2, 2])), ValueError,
     ["lengths", "float32"]),
    ("fisher-lengths-size", lambda t: ops.fisher_linear(A, G, lengths=torch.tensor([1, 2])), ValueError,
     ["lengths", "[2]"]),
    ("fisher-weights-negative", lambda t: ops.fisher_linear(A, G, weights=torch.tensor([1.0, -2, 2])), ValueError,
     ["weights", "-2.0"]),
    ("fisher-weights-nan", lambda t: ops.fisher_linear(A, G, weights=torch.tensor([1.0, float("nan"), 2])),
     ValueError, ["weights", "nan"]),
    ("fisher-weights-int", lambda t: ops.fisher_linear(A, G, weights=torch.tensor([1, 2, 2])), ValueError,
     ["weights", "int64"]),
    ("fisher-out-shape", lambda t: ops.fisher_linear(A, G, out=torch.zeros(5, 6)), ValueError, ["out", "[5, 6]"]),
    ("fisher-out-dtype", lambda t: ops.fisher_linear(A, G, out=torch.zeros(6, 5).double()), ValueError,
     ["out", "float64"]),
    ("fisher-out-strided", lambda t: ops.fisher_linear(A, G, out=torch.zeros(5, 6).T), ValueError,
     ["out", "contiguous", "[6, 5]"]),
    ("bias-rank1", lambda t: ops.fisher_linear_bias(G[0, 0]), ValueError, ["G", "[6]"]),
    ("bias-lengths", lambda t: ops.fisher_linear_bias(G, lengths=torch.tensor([9, 0, 1])), ValueError,
     ["lengths", "9"]),
    ("embedding-ids-range", lambda t: ops.fisher_embedding(IDS.clamp(max=6) + 2, G, 7), ValueError,
     ["ids", "num_embeddings=7", "8"]),
    ("embedding-ids-float", lambda t: ops.fisher_embedding(IDS.float(), G, 7), ValueError, ["ids", "float32"]),
    ("embedding-ids-shape", lambda t: ops.fisher_embedding(IDS[:, :3], G, 7), ValueError, ["ids", "[3, 3]"]),
    ("embedding-num-negative", lambda t: ops.fisher_embedding(IDS, G, -1), ValueError, ["num_embeddings", "-1"]),
    ("dense-k-zero", lambda t: ops.sketch_dense(X, k=0, seed=0), ValueError, ["k", "0"]),
    ("dense-k-float", lambda t: ops.sketch_dense(X, k=2.0, seed=0), ValueError, ["k", "2.0"]),
    ("dense-k-bool", lambda t: ops.sketch_dense(X, k=True, seed=0), ValueError, ["k", "True"]),
    ("dense-seed-negative", lambda t: ops.sketch_dense(X, k=2, seed=-1), ValueError, ["seed", "-1"]),
    ("dense-seed-2**32", lambda t: ops.sketch_dense(X, k=2, seed=2 ** 32), ValueError, ["seed", "4294967296"]),
    ("dense-seed-float", lambda t: ops.sketch_dense(X, k=2, seed=1.5), ValueError, ["seed", "1.5"]),
    ("dense-offset-negative", lambda t: ops.sketch_dense(X, k=2, seed=0, offset=-1), ValueError, ["offset", "-1"]),
    ("dense-offset-overflow", lambda t: ops.sketch_dense(X, k=2, seed=0, offset=2 ** 63 - 2), ValueError,
     ["offset", str(2 ** 63 - 2)]),
    ("dense-dist", lambda t: ops.sketch_dense(X, k=2, seed=0, dist="normal"), ValueError, ["dist", "'normal'"]),
    ("dense-rank3", lambda t: ops.sketch_dense(X[..., None], k=2, seed=0), ValueError, ["X", "[3, 10, 1]"]),
    ("dense-float16", lambda t: ops.sketch_dense(X.half(), k=2, seed=0), ValueError, ["X", "float16"]),
    ("dense-int", lambda t: ops.sketch_dense(X.long(), k=2, seed=0), ValueError, ["X", "int64"]),
    ("kron-k_out", lambda t: ops.sketch_linear(A, G, k_out=0, k_in=2, seed=0), ValueError, ["k_out", "0"]),
    ("kron-k_in", lambda t: ops.sketch_linear(A, G, k_out=2, k_in=-3, seed=0), ValueError, ["k_in", "-3"]),
    ("kron-seed", lambda t: ops.sketch_linear(A, G, k_out=2, k_in=2, seed=2 ** 32), ValueError,
     ["seed", "4294967296"]),
    ("kron-lengths", lambda t: ops.sketch_linear(A, G, k_out=2, k_in=2, seed=0, lengths=torch.tensor([0, 9, 1])),
     ValueError, ["lengths", "9"]),
    ("kron-dist", lambda t: ops.sketch_linear(A, G, k_out=2, k_in=2, seed=0, dist="uniform"), ValueError,
     ["dist", "'uniform'"]),
    ("count-k", lambda t: ops.count_sketch_linear(A, G, k=0, seed=0), ValueError, ["k", "0"]),
    ("count-lengths", lambda t: ops.count_sketch_linear(A, G, k=4, seed=0, lengths=torch.tensor([0, 9, 1])),
     ValueError, ["lengths", "9"]),
    ("count-seed", lambda t: ops.count_sketch_linear(A, G, k=4, seed=-5), ValueError, ["seed", "-5"]),
    ("projection-rows", lambda t: ops.projection_matrix(0, 3, seed=0), ValueError, ["rows", "0"]),
    ("projection-cols", lambda t: ops.projection_matrix(2, -3, seed=0), ValueError, ["cols", "-3"]),
    ("projection-offset", lambda t: ops.projection_matrix(2, 8, seed=0, offset=2 ** 63 - 1), ValueError,
     ["offset", str(2 ** 63 - 1)]),
    # ---- compute_fisher / sketch_gradients: settings and data checked where they enter
    ("fisher-kind", lambda t: decomp.compute_fisher(model("bert"), [batch()], kind="diagonal", progress=False),
     ValueError, ["kind", "'diagonal'"]),
    ("fisher-seed", lambda t: decomp.compute_fisher(model("bert"), [batch()], seed=2 ** 32, progress=False),
     ValueError, ["seed", "4294967296"]),
    ("fisher-batch_size", lambda t: decomp.compute_fisher(model("bert"), [batch()], batch_size=0, progress=False),
     ValueError, ["batch_size", "0"]),
    ("fisher-max_length", lambda t: decomp.compute_fisher(model("bert"), [batch()], max_length=0, progress=False),
     ValueError, ["max_length", "0"]),
    ("fisher-max_examples", lambda t: decomp.compute_fisher(model("bert"), [batch()], max_examples=-1,
                                                           progress=False), ValueError, ["max_examples", "-1"]),
    ("fisher-label-range", lambda t: decomp.compute_fisher(
        model("bert"), [batch(labels=lambda x: x.index_fill(0, torch.tensor([2]), 5))], kind="empirical",
        progress=False), ValueError, ["labels", "num_labels=3", "example 2", "value 5"]),
    ("fisher-label-negative", lambda t: decomp.compute_fisher(
        model("bert"), [batch(labels=lambda x: x.index_fill(0, torch.tensor([1]), -1))], kind="empirical",
        progress=False), ValueError, ["labels", "example 1", "value -1"]),
    ("fisher-token-range", lambda t: decomp.compute_fisher(
        model("bert"), [batch(input_ids=lambda x: x.index_put_((torch.tensor([3]), torch.tensor([0])),
                                                               torch.tensor(VOCAB + 9)))], progress=False),
     ValueError, ["input_ids", f"vocab_size={VOCAB}", "example 3", f"value {VOCAB + 9}"]),
    ("fisher-lm-no-target", lambda t: decomp.compute_fisher(model("gpt2"), [padded_batch("gpt2", [1, 1])],
                                                            kind="empirical", progress=False),
     ValueError, ["no example of the batch has a target token", "examples [0, 1]"]),
    ("fisher-lm-label-range", lambda t: decomp.compute_fisher(
        model("t5"), [batch("t5", labels=lambda x: x.index_fill(1, torch.tensor([0]), VOCAB))], kind="empirical",
        progress=False), ValueError, ["labels", f"vocab_size={VOCAB}", f"value {VOCAB}"]),
    ("sketch-seed", lambda t: decomp.sketch_gradients(model("bert"), [batch()], seed=2 ** 32, **SMALL), ValueError,
     ["seed", "4294967296"]),
    ("sketch-seed-negative", lambda t: decomp.sketch_gradients(model("bert"), [batch()], seed=-1, **SMALL),
     ValueError, ["seed", "-1"]),
    ("sketch-output", lambda t: decomp.sketch_gradients(model("bert"), [batch()], output="margin", **SMALL),
     ValueError, ["output", "'margin'"]),
    ("sketch-k_vector", lambda t: decomp.sketch_gradients(model("bert"), [batch()], **{**SMALL, "k_vector": 0}),
     ValueError, ["k_vector", "0"]),
    ("sketch-k", lambda t: decomp.sketch_gradients(model("bert"), [batch()], k=-2, **SMALL), ValueError,
     ["k", "-2"]),
    ("sketch-target", lambda t: decomp.sketch_gradients(model("bert"), [batch()], output="logit", target=5,
                                                        **SMALL), ValueError, ["target", "num_labels=3", "5"]),
    ("sketch-target-negative", lambda t: decomp.sketch_gradients(model("bert"), [batch()], output="logit",
                                                                 target=-1, **SMALL), ValueError, ["target", "-1"]),
    ("sketch-batch_size", lambda t: decomp.sketch_gradients(model("bert"), [batch()], batch_size=0, **SMALL),
     ValueError, ["batch_size", "0"]),
    ("sketch-max_length", lambda t: decomp.sketch_gradients(model("bert"), [batch()], max_length=0, **SMALL),
     ValueError, ["max_length", "0"]),
    ("sketch-label-range", lambda t: decomp.sketch_gradients(
        model("bert"), [batch(labels=lambda x: x.index_fill(0, torch.tensor([0]), 3))], **SMALL), ValueError,
     ["labels", "num_labels=3", "example 0", "value 3"]),
    ("sketch-token-range", lambda t: decomp.sketch_gradients(
        model("gpt2"), [batch("gpt2", input_ids=lambda x: x.index_fill(1, torch.tensor([0]), -4))], **SMALL),
     ValueError, ["input_ids", "example 0", "value -4"]),
    ("sketch-store-foreign", lambda t: decomp.sketch_gradients(model("bert"), [batch()], store=t / "foreign",
                                                               **SMALL), ValueError, ["foreign", "not an empty"]),
    ("sketch-store-file", lambda t: decomp.sketch_gradients(model("bert"), [batch()], store=t / "garbage.bin",
                                                            **SMALL), ValueError, ["garbage.bin"]),
    # ---- stores: other settings, weights or data; damage
    ("store-other-seed", lambda t: resume(t, seed=1), ValueError, ["different configuration", "seed", "[0]", "[1]"]),
    ("store-other-weights", lambda t: resume(t, model_seed=1), ValueError, ["other model weights", "store"]),
    ("store-other-data", lambda t: resume(t, data=[padded_batch("bert", LENGTHS, seed=2)]), ValueError,
     ["other data", "store", "4 committed examples"]),
    ("store-more-data", lambda t: resume(t, data=[padded_batch("bert", LENGTHS), padded_batch("bert", [2, 3])]),
     ValueError, ["finished run of 4 examples", "more"]),
    ("store-fewer-data", lambda t: resume(t, data=[padded_batch("bert", LENGTHS)], max_examples=2), ValueError,
     ["other data", "first 2 examples"]),
    ("store-resume-other-data", lambda t: (unfinished(t), resume(t, data=[padded_batch("bert", LENGTHS, seed=7)])),
     ValueError, ["other data", "4 committed examples"]),
    ("store-resume-other-weights", lambda t: (unfinished(t), resume(t, model_seed=2)), ValueError,
     ["other model weights"]),
    ("store-resume-truncated", lambda t: (unfinished(t), truncated(t / "store" / "features.f32", row_bytes(t / "store") * 3),
                                          resume(t)), DamagedStoreError, ["features.f32", "first bad row 3"]),
    ("store-resume-progress", lambda t: (damaged_store(t, "progress"), resume(t)), DamagedStoreError,
     ["progress-0.json", "damaged"]),
    ("load-store-missing", lambda t: decomp.GradientSketch.load(t / "nowhere"), FileNotFoundError, ["nowhere"]),
    ("load-store-meta", lambda t: decomp.GradientSketch.load(damaged_store(t, "meta")), DamagedStoreError,
     ["meta.json", "damaged"]),
    ("load-store-truncated", lambda t: decomp.GradientSketch.load(damaged_store(t, "truncated")), DamagedStoreError,
     ["features.f32", "holds 2 rows", "first bad row 2"]),
    ("load-store-flipped", lambda t: decomp.GradientSketch.load(damaged_store(t, "flipped")), DamagedStoreError,
     ["row 2", "checksum"]),
    ("load-store-rows", lambda t: decomp.GradientSketch.load(damaged_store(t, "rows")), DamagedStoreError,
     ["holds 4 rows", "first bad row 4"]),
    ("pca-store-unfinished", lambda t: decomp.pca(unfinished(t), 2), ValueError, ["unfinished run", "store"]),
    ("pca-store-truncated", lambda t: decomp.pca(damaged_store(t, "truncated"), 2), DamagedStoreError,
     ["features.f32", "first bad row 2"]),
    # ---- Fisher and Components files
    ("fisher-load-missing", lambda t: decomp.Fisher.load(t / "none.safetensors"), FileNotFoundError,
     ["none.safetensors"]),
    ("fisher-load-garbage", lambda t: decomp.Fisher.load(t / "garbage.bin"), ValueError, ["garbage.bin"]),
    ("fisher-load-truncated", truncated_fisher, ValueError, ["fisher.safetensors"]),
    ("fisher-load-plain", plain_safetensors, ValueError, ["plain.safetensors", "metadata"]),
    ("fisher-load-components", lambda t: decomp.Fisher.load(t / "components.safetensors"), ValueError,
     ["components.safetensors"]),
    ("fisher-load-nan", nan_fisher, ValueError, ["fisher.safetensors", "tensor", "nan"]),
    ("fisher-load-negative", negative_fisher, ValueError, ["fisher.safetensors", "tensor", "-1.0"]),
    ("fisher-save-foreign", lambda t: decomp.Fisher.load(t / "fisher.safetensors").save(t / "garbage.bin"),
     FileExistsError, ["garbage.bin", "not a decomp Fisher"]),
    ("fisher-save-foreign-overwrite", lambda t: decomp.Fisher.load(t / "fisher.safetensors").save(
        t / "garbage.bin", overwrite=True), FileExistsError, ["garbage.bin", "never replaces"]),
    ("fisher-save-existing", lambda t: decomp.Fisher.load(t / "fisher.safetensors").save(t / "fisher.safetensors"),
     FileExistsError, ["fisher.safetensors", "overwrite=True"]),
    ("fisher-save-onto-dir", lambda t: decomp.Fisher.load(t / "fisher.safetensors").save(t / "foreign",
                                                                                          overwrite=True),
     FileExistsError, ["foreign"]),
    ("sketch-save-foreign", lambda t: decomp.GradientSketch.load(t / "store").save(t / "foreign", overwrite=True),
     FileExistsError, ["foreign", "not a decomp sketch store"]),
    ("sketch-save-file", lambda t: decomp.GradientSketch.load(t / "store").save(t / "garbage.bin"),
     FileExistsError, ["garbage.bin"]),
    ("sketch-save-existing", lambda t: decomp.sketch_gradients(model("bert"), [batch()], **SMALL).save(t / "store"),
     FileExistsError, ["store", "overwrite=True"]),
    ("components-load-missing", lambda t: decomp.Components.load(t / "none.safetensors"), FileNotFoundError,
     ["none.safetensors"]),
    ("components-load-garbage", lambda t: decomp.Components.load(t / "garbage.bin"), ValueError, ["garbage.bin"]),
    ("components-load-fisher", lambda t: decomp.Components.load(t / "fisher.safetensors"), ValueError,
     ["fisher.safetensors", "no decomp components"]),
    ("components-load-truncated", lambda t: (truncated(t / "components.safetensors", 40),
                                             decomp.Components.load(t / "components.safetensors")),
     ValueError, ["components.safetensors"]),
    # ---- decompositions and prepare
    ("pca-n_components-zero", lambda t: decomp.pca(FEATURES, 0), ValueError, ["n_components", "0"]),
    ("pca-n_components-large", lambda t: decomp.pca(FEATURES, 7), ValueError, ["n_components", "7"]),
    ("pca-n_components-float", lambda t: decomp.pca(FEATURES, 2.5), ValueError, ["n_components", "2.5"]),
    ("pca-constant", lambda t: decomp.pca(torch.ones(10, 6), 2), ValueError, ["x", "zero variance"]),
    ("pca-constant-streaming", lambda t: decomp.pca(torch.ones(10, 6), 1, method="streaming"), ValueError,
     ["x", "zero variance"]),
    ("pca-rank", lambda t: decomp.pca(FEATURES[:, :2] @ torch.randn(2, 6), 3), ValueError,
     ["n_components=3", "rank", "2"]),
    ("pca-rank-centred", lambda t: decomp.pca(FOUR, 4, method="streaming"), ValueError,
     ["n_components=4", "rank", "min(N - 1, K) = 3"]),
    ("pca-rank-exact", lambda t: decomp.pca(FOUR, 4, method="exact"), ValueError, ["n_components=4", "which is 3"]),
    ("pca-method", lambda t: decomp.pca(FEATURES, 2, method="svd"), ValueError, ["method", "'svd'"]),
    ("pca-nan", lambda t: decomp.pca(NAN_ROW, 1), ValueError, ["x", "non-finite", "row 1"]),
    ("pca-1d", lambda t: decomp.pca(FEATURES[0], 1), ValueError, ["x", "[6]"]),
    ("pca-one-example", lambda t: decomp.pca(FEATURES[:1], 1), ValueError, ["x", "[1, 6]"]),
    ("ica-rank", lambda t: decomp.ica(torch.ones(10, 6), 2), ValueError, ["x", "zero variance"]),
    ("ica-n_components", lambda t: decomp.ica(FEATURES, -1), ValueError, ["n_components", "-1"]),
    ("cluster-k", lambda t: decomp.cluster(FEATURES, 1), ValueError, ["k", "1"]),
    ("cluster-k-large", lambda t: decomp.cluster(FEATURES, 11), ValueError, ["k", "11"]),
    ("cluster-duplicates", lambda t: decomp.cluster(torch.ones(10, 6), 3), ValueError,
     ["k=3", "distinct", "1"]),
    ("prepare-sign_by-shape", lambda t: decomp.prepare(FEATURES, sign_by=torch.ones(3)), ValueError,
     ["sign_by", "[3]"]),
    ("prepare-sign_by-classes", lambda t: decomp.prepare(FEATURES, sign_by=torch.arange(10) % 3), ValueError,
     ["sign_by", "3"]),
    ("prepare-sign_by-string", lambda t: decomp.prepare(FEATURES, sign_by="predictions"), ValueError,
     ["sign_by", "'predictions'"]),
    ("prepare-project_out", lambda t: decomp.prepare(FEATURES, project_out=torch.ones(5)), ValueError,
     ["project_out", "[5]"]),
    ("prepare-project_out-zero", lambda t: decomp.prepare(FEATURES, project_out=torch.zeros(6)), ValueError,
     ["project_out", "zero"]),
    ("prepare-x", lambda t: decomp.prepare([[1.0, 2.0]]), ValueError, ["x", "list"]),
    ("component-fishers", lambda t: decomp.component_fishers([], 0), ValueError, ["num_examples", "0"]),
]


DAMAGING = ("store-resume", "load-store", "pca-store", "fisher-load-", "components-load-")   # damage a file first


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_changes_nothing(case, assets, tmp_path):
    name, call, error, needles = case
    setup_files(assets, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error) as raised:
        call(tmp_path)
    message = str(raised.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    after = snapshot(tmp_path)
    if name.startswith(DAMAGING):   # the case damaged a file on purpose; the call itself added or removed nothing
        assert set(after) == set(before), f"paths changed: {set(after) ^ set(before)}"
    else:
        assert after == before, "a failed call changed a file"


def test_the_census_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_one_seed_domain_everywhere():
    """0 <= seed < 2**32 for every entry point; the largest seed is not the smallest wrapped around."""
    features = [decomp.sketch_gradients(model("bert"), [batch()], seed=s, **SMALL).features for s in (0, 2 ** 32 - 1)]
    assert not torch.equal(*features)
    for call in (lambda s: ops.sketch_dense(X, k=2, seed=s), lambda s: ops.projection_matrix(2, 3, seed=s),
                 lambda s: decomp.sketch_gradients(model("bert"), [batch()], seed=s, **SMALL),
                 lambda s: decomp.compute_fisher(model("bert"), [batch()], kind="sampled", seed=s, progress=False)):
        for seed in (2 ** 32, -1):
            with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
                call(seed)


def test_a_batch_with_one_short_example_still_counts_it_as_zero():
    """Only a batch without any target token is an error; an example of one token adds a zero gradient."""
    fisher = decomp.compute_fisher(model("gpt2"), [padded_batch("gpt2", [1, 4])], kind="empirical", progress=False)
    assert fisher.num_examples == 2


def test_saves_replace_their_own_files_only_with_overwrite(assets, tmp_path):
    setup_files(assets, tmp_path)
    fisher = decomp.Fisher.load(tmp_path / "fisher.safetensors")
    doubled = decomp.Fisher({k: 2 * v for k, v in fisher.items()}, kind=fisher.kind, num_examples=4)
    doubled.save(tmp_path / "fisher.safetensors", overwrite=True)
    again = decomp.Fisher.load(tmp_path / "fisher.safetensors")
    assert all(torch.equal(again[k], 2 * fisher[k]) for k in fisher)
    sketch = decomp.GradientSketch.load(tmp_path / "store")
    other = decomp.GradientSketch(sketch.features * 3, sketch.indices, sketch.labels, sketch.predictions,
                                  sketch.blocks, sketch.config)
    other.save(tmp_path / "store2")
    decomp.GradientSketch.load(tmp_path / "store2").save(tmp_path / "store", overwrite=True)
    assert torch.equal(decomp.GradientSketch.load(tmp_path / "store").features, sketch.features * 3)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("target", ["fisher", "sketch"])
def test_a_failed_save_leaves_no_trace(assets, tmp_path, monkeypatch, target):
    setup_files(assets, tmp_path)
    before = snapshot(tmp_path)

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if target == "fisher":
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "save_file", failing)
        fisher = decomp.Fisher.load(tmp_path / "fisher.safetensors")
        for path, overwrite in ((tmp_path / "new.safetensors", False), (tmp_path / "fisher.safetensors", True)):
            with pytest.raises(OSError, match="No space"):
                fisher.save(path, overwrite=overwrite)
    else:
        from decomp.gradients import store
        sketch = decomp.GradientSketch.load(tmp_path / "store")
        sketch.path = None
        monkeypatch.setattr(store, "row_checksums", failing)
        for path, overwrite in ((tmp_path / "new", False), (tmp_path / "store", True)):
            with pytest.raises(OSError, match="No space"):
                sketch.save(path, overwrite=overwrite)
    assert snapshot(tmp_path) == before


# --- kernels against their references: property tests ---------------------------------------------------------

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
SIZES = st.sampled_from([0, 1, 2, 3, 7, 17])
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def factors(draw_seed, N, T, fin, fout, dtype, contiguous, with_lengths):
    g = torch.Generator().manual_seed(draw_seed)
    A = make_factor(N, T, fin, dtype, "cpu", g, contiguous)
    G = make_factor(N, T, fout, dtype, "cpu", g, contiguous)
    lengths = make_lengths(N, T, g, "cpu") if with_lengths else None
    return poison_padding(A, lengths), poison_padding(G, lengths), lengths, A, G


@PROPERTY
@given(N=SIZES, T=st.sampled_from([0, 1, 2, 5]), fin=SIZES, fout=SIZES, dtype=DTYPES, contiguous=st.booleans(),
       with_lengths=st.booleans(), with_weights=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_fisher_kernels_match_the_reference(N, T, fin, fout, dtype, contiguous, with_lengths, with_weights, seed):
    A, G, lengths, clean_A, clean_G = factors(seed, N, T, fin, fout, dtype, contiguous, with_lengths)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(seed)) * 2 if with_weights else None
    steps = rounding_steps(N, T)
    result = ops.fisher_linear(A, G, lengths=lengths, weights=weights)
    expected = reference.fisher_linear(clean_A.double(), clean_G.double(), lengths=lengths, weights=weights)
    magnitude = reference.fisher_linear(clean_A.double().abs(), clean_G.double().abs(), lengths=lengths,
                                        weights=weights)
    assert result.shape == (fout, fin) and result.dtype == torch.float32
    assert_within_rounding(result, expected, magnitude, steps, dtype)
    result = ops.fisher_linear_bias(G, lengths=lengths, weights=weights)
    expected = reference.fisher_linear_bias(clean_G.double(), lengths=lengths, weights=weights)
    magnitude = reference.fisher_linear_bias(clean_G.double().abs(), lengths=lengths, weights=weights)
    assert_within_rounding(result, expected, magnitude, steps, dtype)
    vocabulary = max(fin, 1)
    ids = torch.randint(0, min(vocabulary, 3), (N, T), generator=torch.Generator().manual_seed(seed + 1))
    result = ops.fisher_embedding(ids, G, vocabulary, lengths=lengths, weights=weights)
    expected = reference.fisher_embedding(ids, clean_G.double(), vocabulary, lengths=lengths, weights=weights)
    magnitude = reference.fisher_embedding(ids, clean_G.double().abs(), vocabulary, lengths=lengths, weights=weights)
    assert_within_rounding(result, expected, magnitude, steps, dtype)


@PROPERTY
@given(N=SIZES, p=SIZES, k=st.sampled_from([1, 2, 5, 16]), dtype=DTYPES, contiguous=st.booleans(),
       dist=st.sampled_from(["rademacher", "gaussian"]), offset=st.sampled_from([0, 1, 31, 2 ** 40 + 3]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_dense_sketch_and_projection_match_the_reference(N, p, k, dtype, contiguous, dist, offset, seed):
    g = torch.Generator().manual_seed(seed % 2 ** 31)
    X = torch.randn(N, p if contiguous else 2 * p, generator=g).to(dtype)
    X = X if contiguous else X[:, ::2]
    result = ops.sketch_dense(X, k=k, seed=seed, offset=offset, dist=dist)
    expected = reference.sketch_dense(X.double(), k=k, seed=seed, offset=offset, dist=dist)
    S = reference.projection_matrix(k, p, seed=seed, dist=dist, offset=offset, dtype=torch.float64)
    assert result.shape == (N, k)
    assert_within_rounding(result, expected, X.double().abs() @ S.abs().T, p + 4)
    assert torch.equal(ops.projection_matrix(k, p, seed=seed, dist=dist, offset=offset),
                       reference.projection_matrix(k, p, seed=seed, dist=dist, offset=offset))


@PROPERTY
@given(N=SIZES, T=st.sampled_from([0, 1, 2, 5]), fin=SIZES.filter(bool), fout=SIZES.filter(bool), dtype=DTYPES,
       contiguous=st.booleans(), with_lengths=st.booleans(), k=st.sampled_from([1, 3, 8]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_linear_sketches_match_the_reference(N, T, fin, fout, dtype, contiguous, with_lengths, k, seed):
    A, G, lengths, clean_A, clean_G = factors(seed % 2 ** 31, N, T, fin, fout, dtype, contiguous, with_lengths)
    mass = per_example_gradients(clean_A.abs(), clean_G.abs(), lengths)
    result = ops.sketch_linear(A, G, k_out=k, k_in=2, seed=seed, lengths=lengths)
    expected = reference.sketch_linear(clean_A.double(), clean_G.double(), k_out=k, k_in=2, seed=seed,
                                       lengths=lengths)
    S = torch.kron(reference.projection_matrix(k, fout, seed=seed, stream=reference.STREAM_KRON_OUT,
                                               dtype=torch.float64),
                   reference.projection_matrix(2, fin, seed=seed, stream=reference.STREAM_KRON_IN,
                                               dtype=torch.float64))
    assert_within_rounding(result, expected, mass @ S.abs().T, 2 * (T + fin + fout) + 8)
    result = ops.count_sketch_linear(A, G, k=k, seed=seed, lengths=lengths)
    expected = reference.count_sketch_linear(clean_A.double(), clean_G.double(), k=k, seed=seed, lengths=lengths)
    magnitude = mass.sum(1, keepdim=True).expand(N, k)
    assert_within_rounding(result, expected, magnitude, 2 * T + 4 * (math.log2(k) + 2))


# --- IEEE semantics: NaN in, NaN out (at valid positions); padding never read -----------------------------------

def _with_nan(t, index):
    t = t.clone()
    t[index] = float("nan")
    return t


KERNELS = {
    "fisher_linear": lambda m, A, G, ids, L: m.fisher_linear(A, G, lengths=L),
    "fisher_linear_bias": lambda m, A, G, ids, L: m.fisher_linear_bias(G, lengths=L),
    "fisher_embedding": lambda m, A, G, ids, L: m.fisher_embedding(ids, G, 7, lengths=L),
    "sketch_linear": lambda m, A, G, ids, L: m.sketch_linear(A, G, k_out=2, k_in=3, seed=4, lengths=L),
    "count_sketch_linear": lambda m, A, G, ids, L: m.count_sketch_linear(A, G, k=8, seed=4, lengths=L),
    "sketch_dense": lambda m, A, G, ids, L: m.sketch_dense(A.reshape(A.shape[0], -1), k=5, seed=4),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("where", ["A", "G"])
def test_nan_in_is_nan_out_as_in_the_reference(kernel, where):
    lengths = torch.tensor([4, 2, 3])
    A0, G0 = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    A1 = _with_nan(A0, (1, 1, 2)) if where == "A" else A0
    G1 = _with_nan(G0, (1, 1, 2)) if where == "G" else G0
    call = KERNELS[kernel]
    native = call(ops, A1, G1, IDS, lengths)
    expected = call(reference, A1.double(), G1.double(), IDS, lengths)
    assert native.isnan().any() == expected.isnan().any()
    assert torch.equal(native.isnan(), expected.isnan()), kernel
    # a NaN in the padding (position 3 of example 1, whose length is 2) changes nothing
    if kernel != "sketch_dense":
        padded_A = _with_nan(A0, (1, 3, 0))
        padded_G = _with_nan(G0, (1, 3, 0))
        assert torch.equal(call(ops, padded_A, padded_G, IDS, lengths), call(ops, A0, G0, IDS, lengths))


def test_infinity_propagates_like_nan_in_the_dense_sketch():
    X = torch.randn(2, 9)
    X[0, 4] = float("inf")
    result = ops.sketch_dense(X, k=4, seed=0)
    assert bool(torch.isinf(result[0]).all()) and bool(torch.isfinite(result[1]).all())


# --- gradients that turn non-finite are named where they arise -------------------------------------------------

def poisoned_backward(example: int, value: float = float("nan")):
    """A tiny BERT whose backward pass (not its forward) turns NaN (or `value`) for one example of a 4-example
    batch."""
    poisoned = tiny("bert")

    def hook(module, grad_input, grad_output):
        if grad_input[0] is None or grad_input[0].shape[0] < 4:   # the audit's single examples pass
            return None
        g = grad_input[0].clone()
        g[example] = value
        return (g,)

    poisoned.bert.encoder.layer[1].output.dense.register_full_backward_hook(hook)
    return poisoned


def test_non_finite_gradients_name_the_example_and_write_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match="sketched gradient of example 2 is not finite"):
        decomp.sketch_gradients(poisoned_backward(2), [batch()], store=tmp_path / "store", **SMALL)
    assert not list((tmp_path / "store").glob("progress-*.json"))
    for value in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match=r"not finite after the batch of examples 0\.\.3"):
            decomp.compute_fisher(poisoned_backward(1, value), [batch()], kind="empirical", progress=False)
