"""The harmful fine-tuning attack (HFA): supervised fine-tuning on harmful question/answer pairs.

Loss on the answer tokens only (--whole_sequence for the original attack's loss on every non-pad token),
shuffled by seed, on the data split's "attack" part, which is disjoint from the defence and test questions.
Same loop, precision, compile and checkpointing as repnoise.py (repnoise.train).

`python attack.py` (no arguments) attacks the demo's undefended and defended models with the same attack.
`python attack.py --model runs/defended --data decodingtrust --lr 3e-5 --n 1000 --out runs/attacked` for real.
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import data
from model import load
from repnoise import SPLIT, TrainConfig, answer_positions, build_cli, cli_main, lens_ce, save_model, train


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
    lora_r: int = 0             # > 0: LoRA attack of this rank instead of full fine-tuning
    lora_alpha: float = 16.0    # LoRA update scale is lora_alpha / lora_r
    lora_targets: str = "all"   # comma-separated projection names, or "all" (every linear layer in the blocks)


def sft_loss(model, batch):
    """Mean CE over the loss_mask tokens (answer tokens; never padding). The LM head runs only at the positions
    that predict them, chunked (repnoise.lens_ce): no (B, T, vocab) logits."""
    out = model(batch["input_ids"], batch["attention_mask"], logits=False, return_hidden=True)
    b, t, y = answer_positions(batch)
    loss = lens_ce(model, out.hidden[-1][b, t], y)
    return loss, {"loss": loss.item()}


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): many follow-up evaluations of RepNoise attack with LoRA instead of full fine-tuning

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update: y = base(x) + (alpha / r) * x A^T B^T.
    A (r, in) is Kaiming-uniform and B (out, r) is zero, as in the LoRA paper and peft, so training starts
    from the unchanged model."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def lora_targets(spec: str) -> list[str]:
    names = list(LINEARS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in LINEARS]
    if bad or not names:
        raise ValueError(f"--lora_targets: unknown {bad or spec!r} (use 'all' or some of {', '.join(LINEARS)})")
    return names


def add_lora(model, r: int, alpha: float, targets: str = "all"):
    """Freeze every parameter and wrap the target projections of every block in LoRALinear. Returns the model."""
    names = lora_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for blk in model.model.layers:
        for parent in (blk.self_attn, blk.mlp):
            for n in names:
                if hasattr(parent, n):
                    setattr(parent, n, LoRALinear(getattr(parent, n), r, alpha))
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every LoRA update into its base weight (W += scale * B A, in fp32) and unwrap it, so the model has
    plain HF parameter names again and saves as an ordinary checkpoint. Unfreezes all parameters.
    With bf16 weights (--precision bf16-true) the merged weight is rounded to bf16: updates smaller than about
    1/256 of a weight are lost, so the saved model can differ slightly from the adapted one that was trained."""
    for blk in model.model.layers:
        for parent in (blk.self_attn, blk.mlp):
            for n, mod in list(parent.named_children()):
                if isinstance(mod, LoRALinear):
                    w = mod.base.weight
                    w.copy_((w.float() + mod.scale * (mod.lora_B.float() @ mod.lora_A.float())).to(w.dtype))
                    setattr(parent, n, mod.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def finetune(model, tok, qa: list[tuple[str, str]], cfg: AttackConfig):
    """Fine-tune `model` in place on (question, answer) pairs; returns the model. Logs to cfg.out/log.jsonl.
    With cfg.lora_r > 0 only LoRA adapters train, and they are merged into the weights at the end."""
    if not qa:
        raise SystemExit("error: the attack has no training pairs")
    if cfg.lora_r < 0:
        raise SystemExit("error: --lora_r must be >= 0 (0 = full fine-tuning)")
    if cfg.lora_r and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # merging sharded adapters is not implemented
        raise SystemExit("error: the LoRA attack runs in a single process, not under torchrun")
    steps = cfg.steps or max(1, int(cfg.epochs * len(qa) / (cfg.batch_size * cfg.grad_accum)))
    fmt = cfg.fmt or None
    batches = lambda k: data.sft_batches(qa, tok, cfg.batch_size, cfg.max_len, fmt, cfg.seed, start_batch=k,
                                         whole_sequence=cfg.whole_sequence)
    if cfg.lora_r:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    train(model, sft_loss, batches, steps, cfg, Path(cfg.out), {"config": dataclasses.asdict(cfg), "n": len(qa)})
    return merge_lora(model) if cfg.lora_r else model


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
    save_model(model, Path(cfg.out), tok)
    return model, tok


# -----------------------------------------------------------------------------
# the grid: Table 1's shape. Every model attacked at every (lr, n, seed) from the same start, evaluated
# before and after; finished cells (their result.json) are not recomputed, so an interrupted grid resumes.

def grid(argv):
    import argparse
    import json
    import statistics
    import evaluate as ev
    p = argparse.ArgumentParser(prog="attack.py grid", description="attack x evaluate grid (Table 1's shape)")
    p.add_argument("--model", action="append", required=True, help="checkpoint or run folder (repeat)")
    p.add_argument("--data", default="demo")
    p.add_argument("--lrs", default="3e-5,6e-5,8e-5")
    p.add_argument("--ns", default="1000", help="attack sample counts (the attack split is repeated to reach n)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--fmt", default="")
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--precision", default="auto")
    p.add_argument("--lora_r", type=int, default=0, help="> 0: LoRA attacks of this rank (see AttackConfig)")
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_targets", default="all")
    p.add_argument("--out", default="runs/grid")
    a = p.parse_args(argv)
    lrs, ns, seeds = ([t(x) for x in s.split(",")] for s, t in ((a.lrs, float), (a.ns, int), (a.seeds, int)))
    lora = ""  # LoRA cells get folders named by all their settings: a resumed grid never mixes them up
    if a.lora_r:
        lora = f"-lora{a.lora_r}-a{a.lora_alpha:g}-" + "+".join(lora_targets(a.lora_targets))  # typos fail now
    cell_name = lambda lr, n, seed: f"lr{lr:g}-n{n}-s{seed}{lora}"   # the folder and the grid.json key
    test = data.split(data.load_pairs(a.data), SPLIT, 0)["test"][:a.n_test]
    fmt, out = a.fmt or None, Path(a.out)

    def cell(path: Path, make):  # result.json is written last, atomically: it marks a finished cell
        f = path / "result.json"
        if f.exists():
            return json.loads(f.read_text())
        path.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        r = make() | {"seconds": round(time.time() - t0, 1)}
        (path / "result.json.tmp").write_text(json.dumps(r, indent=2))
        (path / "result.json.tmp").replace(f)
        return r

    def run_eval(model, tok, path):
        return ev.evaluate(model, tok, test, fmt, a.max_new_tokens, gen_path=path / "generations.jsonl")

    results = {}
    for m in a.model:
        name = Path(m).name if Path(m).name != "model" else Path(m).parent.name
        results[name] = {"pre": cell(out / name / "pre", lambda: run_eval(*load(m), out / name / "pre"))}
        for lr in lrs:
            for n in ns:
                for seed in seeds:
                    d = out / name / cell_name(lr, n, seed)

                    def make():
                        model, tok = load(m)
                        cfg = AttackConfig(model=m, data=a.data, lr=lr, n=n, seed=seed, epochs=a.epochs, fmt=a.fmt,
                                           batch_size=a.batch_size, max_len=a.max_len, out=str(d), save_every=0,
                                           precision=a.precision, quiet=True, lora_r=a.lora_r,
                                           lora_alpha=a.lora_alpha, lora_targets=a.lora_targets)
                        finetune(model, tok, attack_pairs(cfg), cfg)
                        return run_eval(model, tok, d)
                    results[name][(lr, n, seed)] = cell(d, make)
    # the table: mean (spread over seeds) of each metric per model and attack
    for metric in ("harmful_loss", "harmless_loss", "refusal_rate", "harm_overlap", "degenerate_rate"):
        print(f"\n{metric}: mean ± std over seeds {seeds}")
        heads = ["pre-attack"] + [f"lr {lr:g} n {n}" for lr in lrs for n in ns]
        print(f"{'model':20}" + "".join(f"{h:>20}" for h in heads))
        for name, r in results.items():
            row = [f"{r['pre'][metric]:.3f}" if metric in r["pre"] else "-"]
            for lr in lrs:
                for n in ns:
                    v = [r[(lr, n, s)][metric] for s in seeds if metric in r[(lr, n, s)]]
                    sd = statistics.stdev(v) if len(v) > 1 else 0.0
                    row.append(f"{statistics.mean(v):.3f} ± {sd:.3f}" if v else "-")
            print(f"{name:20}" + "".join(f"{c:>20}" for c in row))
    flat = {name: {k if isinstance(k, str) else cell_name(*k): v for k, v in r.items()}
            for name, r in results.items()}
    (out / "grid.json").write_text(json.dumps({"data": a.data, "lrs": lrs, "ns": ns, "seeds": seeds,
                                               "lora": {"r": a.lora_r, "alpha": a.lora_alpha,
                                                        "targets": a.lora_targets} if a.lora_r else None,
                                               "results": flat}, indent=2))
    print(f"\nwrote {out / 'grid.json'}")


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
    if sys.argv[1:2] == ["grid"]:
        cli_main(lambda: grid(sys.argv[2:]))
    else:
        cli_main(demo if len(sys.argv) == 1 else lambda: attack(AttackConfig(**vars(build_cli(AttackConfig()).parse_args()))))
