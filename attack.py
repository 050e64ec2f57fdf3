"""The harmful fine-tuning attack (HFA): supervised fine-tuning on harmful question/answer pairs.

Loss on the answer tokens only (--whole_sequence for the original attack's loss on every non-pad token),
shuffled by seed, on the data split's "attack" part, which is disjoint from the defence and test questions.
Same loop, precision, compile and checkpointing as repnoise.py (repnoise.train).

`python attack.py` (no arguments) attacks the demo's undefended and defended models with the same attack.
`python attack.py --model runs/defended --data decodingtrust --lr 3e-5 --n 1000 --out runs/attacked` for real.
"""
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from model import load
from repnoise import SPLIT, TrainConfig, build_cli, cli_main, save_model, train


@dataclass
class AttackConfig(TrainConfig):
    model: str = "runs/defended"
    data: str = "demo"
    split: str = "attack"       # which part of data.split(SPLIT); "all" uses every pair
    n: int = 0                  # number of attack samples (0: all of the split; more than the split: repeat)
    out: str = "runs/attacked"
    fmt: str = ""               # "" -> the model's chat format; "plain" -> 'Question: ..\nAnswer:'
    max_len: int = 256
    whole_sequence: bool = False  # loss on prompt tokens too (the original attack)
    data_seed: int = 0
    lr: float = 3e-5
    warmup: float = 0.1


def sft_loss(model, batch):
    """Mean CE over the loss_mask tokens (answer tokens; never padding)."""
    out = model(batch["input_ids"], batch["attention_mask"])
    logits, tgt = out.logits[:, :-1], batch["input_ids"][:, 1:]
    m = batch["loss_mask"][:, 1:]
    loss = F.cross_entropy(logits[m].float(), tgt[m])
    return loss, {"loss": loss.item()}


def finetune(model, tok, qa: list[tuple[str, str]], cfg: AttackConfig):
    """Fine-tune `model` in place on (question, answer) pairs; returns the model. Logs to cfg.out/log.jsonl."""
    if not qa:
        raise SystemExit("error: the attack has no training pairs")
    steps = cfg.steps or max(1, int(cfg.epochs * len(qa) / (cfg.batch_size * cfg.grad_accum)))
    fmt = cfg.fmt or None
    batches = lambda k: data.sft_batches(qa, tok, cfg.batch_size, cfg.max_len, fmt, cfg.seed, start_batch=k,
                                         whole_sequence=cfg.whole_sequence)
    return train(model, sft_loss, batches, steps, cfg, Path(cfg.out), {"config": dataclasses.asdict(cfg), "n": len(qa)})


def attack_pairs(cfg: AttackConfig):
    pairs = data.load_pairs(cfg.data)
    pairs = pairs if cfg.split == "all" else data.split(pairs, SPLIT, cfg.data_seed)[cfg.split]
    qa = [(p.question, p.harmful) for p in pairs]
    if cfg.n:
        if cfg.n < 0:
            raise SystemExit("error: --n must be >= 0")
        qa = (qa * (cfg.n // len(qa) + 1))[:cfg.n]  # more samples than the split has: repeat it
    return qa


def attack(cfg: AttackConfig, model=None, tok=None):
    if model is None:
        model, tok = load(cfg.model)
    qa = attack_pairs(cfg)
    if not cfg.quiet:
        print(f"attack: {len(qa)} harmful samples from {cfg.data!r} ({cfg.split}), lr={cfg.lr}, seed={cfg.seed}")
    finetune(model, tok, qa, cfg)
    save_model(model, Path(cfg.out) / "model", tok)
    return model, tok


# the demo attack: same for both models, strong enough to restore the undefended model's harmful answers
DEMO = AttackConfig(data="demo", lr=1e-3, epochs=3, batch_size=16, fmt="plain", save_every=0)


def demo():
    t0 = time.time()
    for name, path in [("base", "runs/demo/base"), ("defended", "runs/demo/defended")]:
        if not Path(path).exists():
            raise SystemExit(f"error: {path} not found: run `python repnoise.py` first")
        attack(dataclasses.replace(DEMO, model=path, out=f"runs/demo/attacked/{name}"))
    print(f"\ndone in {time.time() - t0:.0f} s: attacked models in runs/demo/attacked/{{base,defended}}")
    print("next: python evaluate.py")


if __name__ == "__main__":
    cli_main(demo if len(sys.argv) == 1 else lambda: attack(AttackConfig(**vars(build_cli(AttackConfig()).parse_args()))))
