"""Parity and speed of model.py on the real SmolLM2-135M-Instruct fixture, beside transformers when installed.

    python ../shared/fixtures/build_smollm2.py      # once: builds ~/.cache/repnoise-fixtures/smollm2-135m-instruct
    python scripts/parity_smollm2.py [checkpoint]
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import generate, load  # noqa: E402

path = sys.argv[1] if len(sys.argv) > 1 else str(Path(os.environ.get("REPNOISE_FIXTURES", Path.home() / ".cache/repnoise-fixtures")) / "smollm2-135m-instruct")
t0 = time.perf_counter()
model, tok = load(path)
print(f"load (fp32): {time.perf_counter() - t0:.2f} s")
ids = tok.encode("The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.")
x = torch.tensor([ids])
prompt = [tok.encode("Once upon a time, in a small village,")]


def tok_per_s(fn, n=64):
    fn()  # warm-up
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


with torch.no_grad():
    ours = model(x).logits
    print(f"greedy, batch 1, 64 new tokens (fp32): ours {tok_per_s(lambda: generate(model, prompt, 64)):.1f} tok/s")
    try:
        import transformers
    except ImportError:
        sys.exit("transformers not installed: no parity numbers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    print(f"max |logits ours - transformers {transformers.__version__}| over {len(ids)} tokens (fp32): "
          f"{(ours - hf(x).logits).abs().max().item():.2e}")
    p = torch.tensor(prompt)
    hf_gen = lambda: hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=64, min_new_tokens=64,
                                 do_sample=False, pad_token_id=tok.pad_id)
    print(f"greedy, batch 1, 64 new tokens (fp32): transformers {tok_per_s(hf_gen):.1f} tok/s")
