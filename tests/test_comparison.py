"""The demo's comparison helpers: predictions come back in the order of the texts, whatever batches they ran in;
a scale searched by rescaling one merge equals merging at each scale."""

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from decomp.app import assets
from decomp.app.finetune import predict


def test_predict_sorts_by_length_for_speed_but_answers_in_the_texts_order():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()
    tokenizer = BertTokenizerFast.from_pretrained(assets.minilm_path())
    texts = ["a much longer sentence about films and plots " * 3, "short", "a medium length text here", "x y",
             "another fairly long piece of text for the batch"]
    one_by_one = torch.stack([predict(model, tokenizer, [t], batch_size=1) for t in texts]).flatten()
    classes, states = predict(model, tokenizer, texts, batch_size=2, hidden=True)
    assert torch.equal(classes, one_by_one)
    for i, text in enumerate(texts):
        _, alone = predict(model, tokenizer, [text], batch_size=1, hidden=True)
        torch.testing.assert_close(states[i], alone[0], rtol=1e-5, atol=1e-5)
    empty = predict(model, tokenizer, [], batch_size=2)
    assert empty.shape == (0,)


def test_a_searched_scale_rescales_one_merge_as_merging_at_that_scale_would(tmp_path):
    import decomp
    from decomp.app.candidates import Candidate
    from decomp.app.comparison import Comparison
    from decomp.app.stored import StoredTensors
    g = torch.Generator().manual_seed(0)
    base = {"bert.layer.weight": torch.randn(6, 5, generator=g), "bert.layer.bias": torch.randn(6, generator=g),
            "classifier.weight": torch.randn(2, 6, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    stored = str(StoredTensors.write(base, tmp_path / "base.safetensors").path)
    for method, search in (("tsv", "scale"), ("task_arithmetic", "scale"), ("regmean", "alpha")):
        inputs = {"grams": [{"bert.layer": torch.eye(5)} for _ in models]} if method == "regmean" else {"base": stored}
        candidate = Candidate(method, method, search=search, values=(0.3, 0.9), inputs={})

        def merged(parameters):
            return {k: v for k, v in decomp.merge(models, method=method, heads="per_task", **inputs,
                                                  **parameters).items() if not k.startswith("classifier.")}
        tried = list(Comparison.tried(candidate, candidate.options({}, len(models)), merged, stored))
        assert [parameters[search] for parameters, _ in tried] == [0.3, 0.9]
        for parameters, encoder in tried:
            direct = merged(parameters)
            assert encoder.keys() == direct.keys()
            for key in direct:
                torch.testing.assert_close(encoder[key], direct[key], rtol=1e-6, atol=1e-6)
