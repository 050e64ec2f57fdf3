"""Which GPU counts and options fit a RepNoise run, by the same estimate repnoise.py prints at start-up.

    python scripts/memory.py                          # llama2-7b-chat, batch 8 x 256 tokens, 80/48/40/24 GiB GPUs
    python scripts/memory.py --config PATH/config.json --tokens 4096

An estimate, not a measurement (there is no GPU here): weights, gradients and AdamW state (sharded over the
GPUs by FSDP2), the activations of one forward (RepNoise back-propagates one half before the other's forward),
the logit-lens rows and fused-CE buffers, and the noise term's MMD; not the allocator's or the CUDA context's
overheads, so leave ~10% headroom.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelConfig  # noqa: E402
from repnoise import memory_estimate  # noqa: E402

# meta-llama/Llama-2-7b-chat-hf config.json (the fields ModelConfig.from_hf reads)
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 4096, "tie_word_embeddings": False}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--config", default="", help="a config.json (default: llama2-7b-chat's)")
p.add_argument("--tokens", type=int, default=8 * 256, help="tokens per micro-batch and half (batch x max_len)")
p.add_argument("--mmd_tokens", type=int, default=1024)
p.add_argument("--gpus", default="80,48,40,24", help="GPU memory sizes in GiB")
a = p.parse_args()
cfg = ModelConfig.from_hf(json.loads(Path(a.config).read_text()) if a.config else LLAMA2_7B)
gpus = [float(g) for g in a.gpus.split(",")]
print(f"{cfg.n_layers} layers, dim {cfg.dim}, {a.tokens} tokens per micro-batch and half, mmd_tokens {a.mmd_tokens}")
print(f"{'precision':11} {'act_ckpt':8} {'GPUs':>4} {'weights':>8} {'grads':>7} {'AdamW':>7} {'bf16':>6} {'activ.':>7}"
      f" {'lens':>6} {'MMD':>6}"
      f" {'total GiB':>9}  fits on (GiB per GPU, with 10% headroom)")
for prec in ("bf16-mixed", "bf16-true"):
    for ckpt in (False, True):
        for world in (1, 2, 4, 8):
            e = memory_estimate(cfg, prec, world, a.tokens, act_ckpt=ckpt, mmd_tokens=a.mmd_tokens)
            fits = ",".join(f"{g:g}" for g in gpus if e["total"] <= 0.9 * g) or "-"
            print(f"{prec:11} {str(ckpt):8} {world:>4} {e['weights']:8.1f} {e['grads']:7.1f} {e['adam']:7.1f} "
                  f"{e['bf16_copies']:6.1f} {e['activations']:7.1f} {e['lens']:6.1f} {e['mmd']:6.1f} {e['total']:9.1f}  {fits}")
print(f"parameters: {e['params_b']:.3f}B")
