"""The model zoo: every Hugging Face family that builds tiny and offline, checked for exact per-example gradients.

Families come from transformers' auto mappings (sequence classification, token classification, causal LM,
seq2seq LM, image classification). Each is built from its config with a generic shrinker (hidden 32, 2 layers,
vocabulary 64, dropout off) and random weights, then run on one padded batch of three examples of different
lengths (right padding; left padding for causal LMs whose forward takes position ids). The per-example gradients
of the unpadded examples, by plain float64 autograd, are computed once and every pass is checked against them:
compute_fisher (empirical, sampled and, for classifiers, exact), sketch_gradients (against the sketch of the
materialised gradients), parameter directions (weighted_gradient_sums) and collect_grams.

The default run checks a representative set; ``pytest --zoo full`` checks every family of every mapping and writes
benchmarks/results/zoo.md (family, task, fast-rule / exact-fallback share of the parameters, status). Families
that cannot be built tiny and offline are skipped with the reason.
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from pathlib import Path

import pytest
import torch

import decomp
from decomp.gradients import hf
from decomp.gradients.directions import weighted_gradient_sums
from decomp.gradients.outputs import fisher_terms
from models import reference_sketch

transformers = pytest.importorskip("transformers")
from transformers import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

MAPPINGS = {
    "classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "image_classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}
# the default run: >= 30 text families over the four text tasks (encoders, decoders, encoder-decoders, the
# three failure classes of issue #16: padded first rows, offset positions, Linear layers without batch dimension)
DEFAULT = [
    ("albert", "classification"), ("bert", "classification"), ("deberta-v2", "classification"),
    ("distilbert", "classification"), ("roberta", "classification"), ("mpnet", "classification"),
    ("squeezebert", "classification"), ("modernbert", "classification"), ("electra", "classification"),
    ("deberta", "token_classification"), ("roformer", "token_classification"), ("mobilebert", "token_classification"),
    ("esm", "token_classification"), ("gpt2", "causal_lm"), ("llama", "causal_lm"), ("mistral", "causal_lm"),
    ("gemma", "causal_lm"), ("gemma2", "causal_lm"), ("phi", "causal_lm"), ("gpt_neox", "causal_lm"),
    ("bloom", "causal_lm"), ("opt", "causal_lm"), ("falcon", "causal_lm"), ("gptj", "causal_lm"),
    ("olmo2", "causal_lm"), ("biogpt", "causal_lm"), ("mixtral", "causal_lm"), ("gpt_bigcode", "causal_lm"),
    ("phimoe", "causal_lm"), ("umt5", "token_classification"), ("xlnet", "token_classification"),
    ("bart", "seq2seq"), ("t5", "seq2seq"), ("mbart", "seq2seq"), ("pegasus", "seq2seq"), ("m2m_100", "seq2seq"),
    ("vit", "image_classification"),
]
# collect_grams (gradients/grams.py) refuses these, naming the layer: DeBERTa's relative-position projections read
# a table without the batch dimension whose span depends on the padded length (DeBERTa-v2's fixed table of
# position buckets counts once per example, exactly); Pegasus-X pads its sequence to its blocks with zeros, which
# the padded batch's padding tokens are not (Longformer pads with padding tokens: exact)
GRAMS_REFUSED = {"deberta": r"collect_grams: deberta\.encoder\.layer\.0\.attention\.self\.pos_proj \(Linear\) reads a "
                            r"table without the batch dimension whose rows depend on the padded length",
                 "pegasus_x": r"collect_grams: model\.encoder\.layers\.0\.self_attn\.q_proj \(Linear\) reads a sequence "
                              r"the model lengthened itself .*Pegasus-X's zero-filled blocks"}
VOCAB = 64
LENGTHS = [5, 3, 7]
MAX_PARAMETERS = 1_000_000   # a config that does not shrink below this (composite, fixed sizes) is not tiny
SIZES = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32, "embedding_size": 32,
    "d_embed": 32, "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "num_decoder_layers": 2,
    "encoder_layers": 2, "decoder_layers": 2, "num_attention_heads": 2, "n_head": 2, "n_heads": 2,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_heads": 2, "num_key_value_heads": 1,
    "head_dim": 16, "d_kv": 16, "d_head": 16, "intermediate_size": 48, "d_ff": 48, "ffn_dim": 48,
    "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "n_inner": 48, "hidden_dim": 48, "d_inner": 48,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "vocab_size": VOCAB, "max_position_embeddings": 64,
    "n_positions": 64, "n_ctx": 64, "rotary_dim": 8, "block_sizes": [1, 1], "image_size": 32, "patch_size": 8,
    "num_channels": 3, "num_labels": 3,
}
# settings of the released checkpoints that the defaults leave off (DeBERTa-v2's relative-position projections)
OVERRIDES = {"deberta-v2": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
                            "max_relative_positions": 16, "share_att_key": True},
             "deberta": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16}}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
             "sep_token_id": 3, "cls_token_id": 3, "mask_token_id": 3}
# float32 against float64 through a forward, a backward and the products: ~1e-6 relative; a dropped use, a wrong
# rule or a padding leak gives O(1). The floor covers gradients that vanish in exact arithmetic (see test_fisher).
RELATIVE = 2e-5
FLOOR = 1e-9
GRADIENT_FLOOR = 1e-7
SKETCH = dict(k_out=4, k_in=4, k_vector=64, seed=3)


# ---- building ------------------------------------------------------------------------------------------------

class Unbuildable(Exception):
    """This family cannot be built tiny and offline here (the reason is the message)."""


def shrink(model_type: str):
    """The family's config with every common size attribute it has set small, dropout off."""
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    kwargs = {}
    for key, value in SIZES.items():
        present = getattr(default, key, None)
        if hasattr(default, key) and not isinstance(getattr(type(default), key, None), property) and \
                (present is None or type(present) is type(value)):
            kwargs[key] = value
    for key in dir(default):
        if ("dropout" in key or "pdrop" in key) and not key.startswith("_") and \
                isinstance(getattr(default, key, None), float):
            kwargs[key] = 0.0
    kwargs["num_labels"] = 3
    kwargs.update(OVERRIDES.get(model_type, {}))
    for key, value in TOKEN_IDS.items():
        if hasattr(default, key) or (key == "decoder_start_token_id" and getattr(default, "is_encoder_decoder", 0)):
            kwargs[key] = value
    config = cls(**kwargs)
    config._experts_implementation = "eager"   # the reference runs in float64, which grouped_mm does not take
    return config


def model_class(model_type: str, task: str):
    name = getattr(modeling_auto, MAPPINGS[task]).get(model_type)
    name = name[0] if isinstance(name, (tuple, list)) else name
    cls = getattr(transformers, name or "", None)
    if cls is None:
        raise Unbuildable(f"transformers has no class {name!r}")
    return cls


def build(model_type: str, task: str, seed: int = 0):
    """A tiny random float32 model in eval mode, with random biases and norm scales (so that no rule passes by
    their default values)."""
    try:
        cls = model_class(model_type, task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = shrink(model_type)
            with torch.device("meta"):
                size = sum(p.numel() for p in cls(config).parameters())
            if size > MAX_PARAMETERS:
                raise Unbuildable(f"the config does not shrink ({size:,} parameters: composite or fixed sizes)")
            torch.manual_seed(seed)
            model = cls(config).eval()
    except Unbuildable:
        raise
    except Exception as error:  # noqa: BLE001 - every reason a family cannot be built is reported
        raise Unbuildable(f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def padded_batch(model, task: str, *, left: bool = False, seed: int = 1) -> dict:
    """Three examples of different lengths, padded (pad id 0, never drawn as a real token)."""
    g = torch.Generator().manual_seed(seed)
    N = len(LENGTHS)
    if task == "image_classification":
        size = model.config.image_size
        return {"pixel_values": torch.randn(N, model.config.num_channels, size, size, generator=g),
                "labels": torch.randint(0, 3, (N,), generator=g)}
    T = max(LENGTHS)
    ids = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    for n, L in enumerate(LENGTHS):
        where = slice(T - L, T) if left else slice(0, L)
        ids[n, where] = torch.randint(4, VOCAB, (L,), generator=g)
        mask[n, where] = 1
    if getattr(model.config, "eos_token_id", None) == 2 and task != "causal_lm":  # BART-style heads pool at </s>
        for n, L in enumerate(LENGTHS):
            ids[n, L - 1] = 2
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        batch["labels"] = torch.randint(0, 3, (N,), generator=g)
    elif task == "token_classification":
        labels = torch.randint(0, 3, (N, T), generator=g).masked_fill(mask == 0, -100)
        labels[0, 1] = -100    # an unlabelled real token (a word piece) is ignored too
        batch["labels"] = labels
    elif task == "causal_lm":   # as a data collator makes them: the inputs, padding ignored
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    elif task == "seq2seq":
        labels = torch.randint(4, VOCAB, (N, 5), generator=g)
        labels[0, 3:] = -100
        batch["labels"] = labels
    return batch


def example(batch: dict, n: int) -> dict:
    """Example n alone, without its padding (with it, for models whose output padding changes)."""
    if "pixel_values" in batch or batch.get("_rows") == "padded":
        return {k: v[n:n + 1] for k, v in batch.items() if not k.startswith("_")}
    if "pixel_values" in batch:
        return {k: v[n:n + 1] for k, v in batch.items()}
    keep = batch["attention_mask"][n].bool()
    single = {k: v[n:n + 1][:, keep] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    labels = batch.get("labels")
    if labels is not None:
        if labels.dim() == 1:
            single["labels"] = labels[n:n + 1]
        elif batch.get("_task") == "seq2seq":
            single["labels"] = labels[n:n + 1][:, labels[n] != -100]
        else:
            single["labels"] = labels[n:n + 1][:, keep]
    return single


# ---- the reference: per-example autograd on the unpadded examples, float64 ----------------------------------

def reference_gradients(model, batch: dict, kinds) -> dict:
    """{kind: [[{name: gradient} per term] per example]} by autograd on each unpadded example, float64."""
    model64 = copy.deepcopy(model).double()
    task = hf.task_of(model)
    params = {name: p for name, p in model64.named_parameters() if p.requires_grad}
    result = {kind: [] for kind in kinds}
    for n in range(len(LENGTHS)):
        single = example(batch, n)
        if "pixel_values" in single:
            single["pixel_values"] = single["pixel_values"].double()
        inputs = hf.model_inputs(model64, single, "cpu")
        logits = model64(**inputs).logits
        for kind in kinds:
            terms = fisher_terms(task, logits, single, torch.tensor([n]), kind=kind)
            per_term = []
            for term in terms:
                grads = torch.autograd.grad(term.sum(), list(params.values()), retain_graph=True, allow_unused=True)
                per_term.append({name: torch.zeros_like(p) if g is None else g
                                 for (name, p), g in zip(params.items(), grads)})
            result[kind].append(per_term)
    return result


def padding_invariant(model, batch: dict) -> bool:
    """Whether each example's output (float64) is the same padded in the batch and alone without padding. Some
    models see their padding (FNet's Fourier mixing, Nystromformer's and YOSO's approximations, ConvBERT's
    convolutions): decomp's gradients are then those of the padded rows, and the reference keeps them too."""
    model64 = copy.deepcopy(model).double()
    task = hf.task_of(model)
    with torch.no_grad():
        for n in range(len(LENGTHS)):
            values = []
            for rows in ("unpadded", "padded"):
                single = example({**batch, "_rows": rows}, n)
                if "pixel_values" in single:
                    single["pixel_values"] = single["pixel_values"].double()
                logits = model64(**hf.model_inputs(model64, single, "cpu")).logits
                values.append(float(fisher_terms(task, logits, single, torch.tensor([n]), kind="empirical")[0]))
            if abs(values[0] - values[1]) > 1e-9 * (1 + abs(values[0])):
                return False
    return True


def reference_grams(model, batch: dict) -> dict:
    """X^T X of every Linear / Conv1D layer's inputs over the unpadded examples, float64."""
    from decomp.gradients.rules import is_conv1d
    model64 = copy.deepcopy(model).double()
    grams, handles, mask = {}, [], {}
    for name, module in model64.named_modules():
        if isinstance(module, torch.nn.Linear) or is_conv1d(module):
            def hook(module, args, output, name=name):
                x = args[0]
                rows = mask.get("rows")   # [1, L]: all ones, but for an example that keeps its padding
                if rows is not None:      # its tokens as [1, L, in], flattened [L, in] or time-major [L, 1, in]
                    for layout in (rows, rows.T, rows[0]):
                        if x.shape[:-1] == layout.shape:
                            x = x * layout[..., None]
                            break
                x = x.reshape(-1, x.shape[-1])
                grams[name] = grams.get(name, 0) + x.T @ x
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for n in range(len(LENGTHS)):
            single = example(batch, n)
            if "pixel_values" in single:
                single["pixel_values"] = single["pixel_values"].double()
            if "attention_mask" in single:
                mask["rows"] = single["attention_mask"].double()
            model64(**hf.model_inputs(model64, single, "cpu"))
    for handle in handles:
        handle.remove()
    return grams


# ---- comparing -----------------------------------------------------------------------------------------------

def mismatches(got: dict, expected: dict, what: str, floor: float = FLOOR) -> list[str]:
    """Names whose tensors differ beyond float32 rounding (relative, with a floor: for squares, that of
    test_fisher; for gradients themselves, its square root, float32's epsilon)."""
    if not expected:
        return []
    scale = max(float(t.abs().max()) for t in expected.values())
    bad = []
    for name, ref in expected.items():
        if name not in got:
            bad.append(f"{what}: {name} missing")
            continue
        error = float((got[name].double().cpu() - ref).norm())
        if not error <= RELATIVE * float(ref.norm()) + floor * scale * ref.numel() ** 0.5:
            bad.append(f"{what}: {name} error {error:.3g} (reference norm {float(ref.norm()):.3g})")
    return bad


def check_family(model_type: str, task: str) -> dict:
    """Builds the family and checks every pass; returns a row of the zoo table (raises Unbuildable)."""
    start = time.perf_counter()
    model = build(model_type, task)
    if task == "image_classification" and not all(hasattr(model.config, k) for k in ("image_size", "num_channels")):
        raise Unbuildable("the config has no image_size / num_channels: not a pixel_values model of one image size")
    decomp_task = hf.task_of(model)
    left = task == "causal_lm" and "position_ids" in __import__("inspect").signature(model.forward).parameters
    batch = padded_batch(model, task, left=left)
    batch_task = {"_task": decomp_task}
    kinds = ["empirical", "sampled"] + (["exact"] if decomp_task == "classification" else [])
    try:
        if not padding_invariant(model, {**batch, **batch_task}):   # then the reference keeps each row's padding
            batch_task["_rows"] = "padded"
        expected = reference_gradients(model, {**batch, **batch_task}, kinds)
    except Exception as error:  # noqa: BLE001 - the model itself, without decomp, fails on this tiny batch
        raise Unbuildable(f"the model's own forward or backward (float64) fails on the tiny batch: "
                          f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")
    if not all(bool(torch.isfinite(g).all()) for terms in expected["empirical"] for g in terms[0].values()):
        raise Unbuildable("float64 autograd of the model itself gives non-finite gradients on this batch (fully "
                          "masked attention rows)")
    N, failures = len(LENGTHS), []
    fisher = None
    for kind in kinds:
        fisher = decomp.compute_fisher(model, [batch], kind=kind, progress=False)
        want = {name: sum(g[name] ** 2 for terms in expected[kind] for g in terms) / N for name in fisher}
        failures += mismatches(fisher, want, f"fisher {kind}")
    gold = [terms[0] for terms in expected["empirical"]]
    sketch = decomp.sketch_gradients(model, [batch], output="logprob", progress=False, **SKETCH)
    want = reference_sketch(gold, sketch.blocks)
    floor = 1e-7 * float(want.norm())   # blocks whose gradients vanish in exact arithmetic: rounding noise
    for block in sketch.blocks:
        columns = slice(block["start"], block["start"] + block["size"])
        error = float((sketch.features[:, columns].double() - want[:, columns]).norm())
        if not error <= RELATIVE * float(want[:, columns].norm()) + floor:
            failures.append(f"sketch: block {block['name']} error {error:.3g}")
    weights = torch.tensor([[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75]])
    directions = weighted_gradient_sums(model, [batch], weights, progress=False)
    for c in range(weights.shape[1]):
        want = {name: sum(float(weights[n, c]) * gold[n][name] for n in range(N)) for name in directions[c]}
        failures += mismatches(directions[c], want, f"direction {c}", floor=GRADIENT_FLOOR)
    refused = None
    try:
        grams = decomp.collect_grams(model, [batch], progress=False)
    except NotImplementedError as error:   # an explicit refusal naming the layer, never a silently wrong Gram
        refused = str(error)
    else:
        failures += mismatches(grams, reference_grams(model, {**batch, **batch_task}), "grams")
    coverage = fisher.coverage
    sizes = dict((name, p.numel()) for name, p in model.named_parameters() if p.requires_grad)
    fallback = sum(sizes[name] for name, rule in coverage.items() if rule.startswith("fallback"))
    return {"family": model_type, "task": task, "parameters": sum(sizes.values()),
            "fast": 1 - fallback / sum(sizes.values()), "fallback": fallback / sum(sizes.values()),
            "fallback_names": [name for name, rule in coverage.items() if rule.startswith("fallback")],
            "padding": ("left" if left else "right") + (", changes the output" if "_rows" in batch_task else ""),
            "failures": failures, "grams_refused": refused,
            "seconds": time.perf_counter() - start}


# ---- the tests -----------------------------------------------------------------------------------------------

def all_pairs() -> list[tuple[str, str]]:
    return [(family, task) for task, mapping in MAPPINGS.items() for family in getattr(modeling_auto, mapping)]


def pytest_generate_tests(metafunc):
    if "zoo_family" in metafunc.fixturenames:
        pairs = all_pairs() if metafunc.config.getoption("--zoo") == "full" else DEFAULT
        metafunc.parametrize("zoo_family,zoo_task", pairs, ids=[f"{family}-{task}" for family, task in pairs])


RESULTS: dict = {}


def checked(family: str, task: str) -> dict:
    """check_family once per session (the table and several tests read the same row)."""
    if (family, task) not in RESULTS:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)   # tiny models: threads only contend
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                RESULTS[family, task] = check_family(family, task)
        except Unbuildable as error:
            RESULTS[family, task] = {"family": family, "task": task, "unbuildable": str(error)}
        except Exception as error:  # noqa: BLE001 - reported in the table, re-raised by the test
            RESULTS[family, task] = {"family": family, "task": task, "error": error}
        finally:
            torch.set_num_threads(threads)
    return RESULTS[family, task]


TABLE = Path(__file__).parent.parent / "benchmarks" / "results" / "zoo.md"


@pytest.fixture(autouse=True)
def zoo_table(request):
    """With --zoo full, the table is rewritten after every family (a long run leaves a table however it ends)."""
    yield
    if request.config.getoption("--zoo") == "full" and RESULTS:
        write_table(TABLE)


def status(row: dict) -> str:
    if "unbuildable" in row:
        return f"not built: {row['unbuildable']}"
    if "error" in row:
        return f"error: {type(row['error']).__name__}: {str(row['error']).splitlines()[0][:200]}"
    functions = sorted({failure.split(":")[0] for failure in row["failures"]})
    if row.get("grams_refused") and not functions:
        return f"exact; collect_grams refuses: {row['grams_refused'].removeprefix('collect_grams: ')}"
    return "exact" if not functions else "mismatch: " + ", ".join(functions)


def write_table(path: Path) -> None:
    rows = sorted(RESULTS.values(), key=lambda r: (r["task"], r["family"]))
    pending = [pair for pair in all_pairs() if pair not in RESULTS]
    built = [r for r in rows if "unbuildable" not in r]
    exact = [r for r in built if status(r) == "exact"]
    gradients = [r for r in built if "error" not in r and not any(not f.startswith("grams") for f in r["failures"])]
    refused = [r for r in gradients if r.get("grams_refused") and not r["failures"]]
    lines = [
        "# The model zoo: exact per-example gradients across Hugging Face families",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}. Generated by "
        "`python -m pytest tests/test_zoo.py --zoo full`: each family of each auto mapping built tiny from its config "
        "(hidden 32, 2 layers, vocabulary 64, random weights), one padded batch of 3 examples of lengths "
        f"{LENGTHS} checked against float64 per-example autograd on the unpadded examples: compute_fisher "
        "(empirical, sampled, exact for classifiers), sketch_gradients, parameter directions and collect_grams.",
        "",
        f"{len(rows)} (family, task) pairs; {len(built)} built; {len(gradients)} exact on every gradient function "
        f"({len(exact)} also on collect_grams, {len(exact) / max(len(gradients), 1):.1%}; on {len(refused)}, "
        "collect_grams refuses with an error naming the layer and why). 'fast' is the share of the parameters (by "
        "count) that a fast rule covers, 'fallback' the share that the exact per-example autograd fallback covers.",
        "",
        "| family | task | parameters | fast | fallback | padding | status |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "parameters" in r:
            lines.append(f"| {r['family']} | {r['task']} | {r['parameters']:,} | {r['fast']:.1%} | "
                         f"{r['fallback']:.1%} | {r['padding']} | {status(r)} |")
        else:
            lines.append(f"| {r['family']} | {r['task']} | | | | | {status(r).replace('|', '/')} |")
    if pending:
        lines += ["", f"Not checked in this run ({len(pending)}): " + ", ".join(f"{f} ({t})" for f, t in pending)]
    path.write_text("\n".join(lines) + "\n")


def test_family_is_exact(zoo_family, zoo_task, request):
    family, task = zoo_family, zoo_task
    row = checked(family, task)
    if "unbuildable" in row:
        pytest.skip(f"{family} ({task}) cannot be built tiny and offline: {row['unbuildable']}")
    if "error" in row:
        raise row["error"]
    wrong = [failure for failure in row["failures"] if not failure.startswith("grams")]
    if wrong and "changes the output" in row["padding"]:
        pytest.xfail(f"{family}'s output depends on its padding tokens (the audit moves what it sees beyond its "
                     f"1e-3 tolerance to the exact fallback; the rest drops padding positions): {wrong[0]}")
    assert not wrong, f"{family} ({task}): " + "; ".join(wrong[:6])
    full = request.config.getoption("--zoo") == "full"
    if family in GRAMS_REFUSED:
        assert re.match(GRAMS_REFUSED[family], row["grams_refused"] or ""), row["grams_refused"]
        return
    if row["grams_refused"] and full:
        pytest.xfail(row["grams_refused"])
    assert not row["grams_refused"], row["grams_refused"]
    grams = [failure for failure in row["failures"] if failure.startswith("grams")]
    if grams and full:
        pytest.xfail(f"collect_grams (gradients/grams.py): {grams[0]}")
    assert not grams, "; ".join(grams[:6])


# ---- the failure classes of issue #16, one by one -------------------------------------------------------------

def gold_gradients(model, batch: dict, task: str) -> list[dict]:
    """Each example's gradient of log p(gold), written out by hand on the unpadded example (not through decomp's
    output functions): the label's log-probability for classifiers, the sum over labelled tokens (-100 ignored)
    for token classification, over next tokens for causal LMs."""
    model64 = copy.deepcopy(model).double()
    params = {name: p for name, p in model64.named_parameters() if p.requires_grad}
    grads = []
    for n in range(len(LENGTHS)):
        single = example(batch, n)
        labels = single.pop("labels")
        if "pixel_values" in single:
            single["pixel_values"] = single["pixel_values"].double()
        log_probs = model64(**single).logits.log_softmax(-1)[0]
        if task == "causal_lm":
            log_probs, labels = log_probs[:-1], labels[:, 1:]
        if labels.dim() == 2:
            keep = labels[0] != -100
            total = log_probs[keep].gather(1, labels[0, keep][:, None]).sum()
        else:
            total = log_probs[labels[0]]
        found = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        grads.append({name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), found)})
    return grads


def assert_gradients_exact(model, batches: list, expected: list[dict]) -> None:
    weights = torch.eye(len(expected))   # identity weights: each example's own gradient
    got = weighted_gradient_sums(model, batches, weights, progress=False)
    failures = [f for n in range(len(expected)) for f in mismatches(got[n], expected[n], f"example {n}",
                                                                    floor=GRADIENT_FLOOR)]
    assert not failures, "; ".join(failures[:5])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_whose_first_row_is_right_padded_with_labels(family):
    model = build(family, "causal_lm")
    batch = padded_batch(model, "causal_lm")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1] and "labels" in batch
    assert_gradients_exact(model, [batch], gold_gradients(model, batch, "causal_lm"))


@pytest.mark.parametrize("family,task", [("opt", "causal_lm"), ("bart", "seq2seq")])
def test_offset_position_embeddings_keep_the_fast_rule(family, task):
    model = build(family, task)
    batch = padded_batch(model, task)
    coverage = decomp.coverage(model, [batch])
    positions = [name for name in coverage if "embed_positions" in name]
    assert positions and all(coverage[name] == "embedding" for name in positions), coverage
    if task == "causal_lm":
        assert_gradients_exact(model, [batch], gold_gradients(model, batch, task))


def test_linear_without_batch_dimension_moves_to_the_fallback_even_after_the_audit():
    model = build("deberta-v2", "classification")
    batch = padded_batch(model, "classification")
    first = {k: v[:1] for k, v in batch.items()}     # a batch of one: the relative projections fit it
    rest = {k: v[1:] for k, v in batch.items()}
    with pytest.warns(UserWarning, match=r"query_proj.*no batch dimension.*decomp.coverage") as announced:
        fisher = decomp.compute_fisher(model, [first, rest], kind="empirical", progress=False)
    assert len([w for w in announced if "query_proj" in str(w.message)]) == 1     # announced once
    name = "deberta.encoder.layer.0.attention.self.query_proj.weight"
    assert fisher.coverage[name].startswith("fallback") and "no batch dimension" in fisher.coverage[name]
    expected = reference_gradients(model, batch, ["empirical"])["empirical"]
    want = {k: sum(terms[0][k] ** 2 for terms in expected) / len(LENGTHS) for k in fisher}
    assert not mismatches(fisher, want, "fisher")
    assert decomp.coverage(build("deberta-v2", "classification"))[name] == "linear"   # statically, before an audit
    assert decomp.coverage(model, [batch])[name].startswith("fallback")


def test_no_path_asks_the_user_to_report_a_model_type():
    """No message on any path of compute_fisher, sketch_gradients, parameter_directions or collect_grams (the
    gradient passes, the kernels they call, the distributed helpers) asks the user to report a model; what no rule
    covers goes to the exact fallback, which decomp.coverage reports."""
    root = Path(decomp.__file__).parent
    sources = [*sorted((root / "gradients").glob("*.py")), *sorted((root / "kernels").glob("*.py")),
               root / "distributed.py", *sorted((root.parent.parent / "csrc").rglob("*.[ch]*"))]
    asking = re.compile(r"please report|report (this|the|it|your|an?)\b|(open|file) an issue|/issues", re.I)
    assert len(sources) > 10
    for path in sources:
        assert not asking.search(path.read_text()), path
    model = build("vit", "image_classification")   # without data: statically, from the module types
    fallback = {name: rule for name, rule in decomp.coverage(model).items() if rule.startswith("fallback")}
    assert "vit.embeddings.cls_token" in fallback and "no rule for ViTEmbeddings" in fallback["vit.embeddings.cls_token"]


def test_collect_grams_refuses_a_table_that_depends_on_the_padded_length():
    model = build("deberta", "classification")
    batch = padded_batch(model, "classification")
    with pytest.raises(NotImplementedError, match=GRAMS_REFUSED["deberta"] + r".*\[1, 14, 32\] in a batch padded to 7"):
        decomp.collect_grams(model, [batch], progress=False)
    same = {k: v[:, :3] if v.dim() == 2 else v for k, v in batch.items()}   # no padding: every example reads it
    same["attention_mask"] = torch.ones_like(same["attention_mask"])
    assert not mismatches(decomp.collect_grams(model, [same], progress=False), reference_grams(model, same), "grams")
    model = build("deberta-v2", "classification")   # a fixed table of position buckets: counted once per example
    assert not mismatches(decomp.collect_grams(model, [batch], progress=False), reference_grams(model, batch), "grams")


def test_collect_grams_checks_a_sequence_the_model_lengthens_itself():
    model = build("pegasus_x", "seq2seq")   # zeros to its blocks of 512: not what the batch's padding tokens give
    with pytest.raises(NotImplementedError, match=GRAMS_REFUSED["pegasus_x"]):
        decomp.collect_grams(model, [padded_batch(model, "seq2seq")], progress=False)
    model = build("longformer", "classification")   # padding tokens to its window of 512: what the batch has
    batch = padded_batch(model, "classification")
    assert not mismatches(decomp.collect_grams(model, [batch], progress=False), reference_grams(model, batch), "grams")


def test_collect_grams_reads_time_major_rows_and_refuses_a_square_first_batch():
    model = build("xlnet", "token_classification")
    batch = padded_batch(model, "token_classification")
    square = {k: v[:, :3] for k, v in batch.items()}   # 3 examples of 3 tokens: [T, N] and [N, T] look alike
    with pytest.raises(NotImplementedError, match=r"collect_grams: transformer\.layer\.0\.ff\.layer_1 \(Linear\) "
                                                  r"reads \[3, 3, 32\] in a model whose ids run time-major"):
        decomp.collect_grams(model, [square], progress=False)
    both = decomp.collect_grams(model, [batch, square], progress=False)   # the first batch showed each layout
    want = reference_grams(model, batch)
    for name, gram in reference_grams(model, square).items():
        want[name] = want[name] + gram
    assert not mismatches(both, want, "grams")


def test_token_classification_sums_labelled_tokens_and_ignores_minus_100():
    model = build("bert", "token_classification")
    batch = padded_batch(model, "token_classification")
    assert int((batch["labels"][0][batch["attention_mask"][0].bool()] == -100).sum()) == 1
    expected = gold_gradients(model, batch, "token_classification")
    assert_gradients_exact(model, [batch], expected)
    sketch = decomp.sketch_gradients(model, [batch], progress=False, **SKETCH)
    assert torch.allclose(sketch.features.double(), reference_sketch(expected, sketch.blocks), rtol=1e-4,
                          atol=1e-7 * float(sketch.features.norm()))


def test_image_classification_through_the_same_api_with_the_fallback_announced():
    model = build("vit", "image_classification")
    batch = padded_batch(model, "image_classification")
    with pytest.warns(UserWarning, match=r"\d% of its parameters.*vit\.embeddings\.cls_token"):
        fisher = decomp.compute_fisher(model, [batch], kind="exact", progress=False)
    assert fisher.coverage["vit.embeddings.patch_embeddings.projection.weight"] == "conv2d"   # unfold
    assert fisher.coverage["vit.embeddings.patch_embeddings.projection.bias"] == "bias"
    assert fisher.coverage["vit.embeddings.cls_token"].startswith("fallback: no rule for ViTEmbeddings")
    assert_gradients_exact(model, [batch], gold_gradients(model, batch, "image_classification"))
    padded = torch.nn.Conv2d(3, 4, 3, padding=1, stride=2)   # the rule's unfold with padding and stride
    x, g = torch.randn(2, 3, 7, 7), torch.randn(2, 4, 4, 4)
    from decomp.gradients.rules import conv2d_gradients
    expected = [torch.autograd.grad(padded(x[n:n + 1]), padded.weight, g[n:n + 1])[0].flatten() for n in range(2)]
    torch.testing.assert_close(conv2d_gradients(padded, x, g), torch.stack(expected), rtol=1e-5, atol=1e-6)
