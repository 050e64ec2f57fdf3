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
    p.add_argument("--out", default="runs/grid")
    a = p.parse_args(argv)
    lrs, ns, seeds = ([t(x) for x in s.split(",")] for s, t in ((a.lrs, float), (a.ns, int), (a.seeds, int)))
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
                    d = out / name / f"lr{lr:g}-n{n}-s{seed}"

                    def make():
                        model, tok = load(m)
                        cfg = AttackConfig(model=m, data=a.data, lr=lr, n=n, seed=seed, epochs=a.epochs, fmt=a.fmt,
                                           batch_size=a.batch_size, max_len=a.max_len, out=str(d), save_every=0,
                                           precision=a.precision, quiet=True)
                        finetune(model, tok, attack_pairs(cfg), cfg)
                        return run_eval(model, tok, d)
                    results[name][(lr, n, seed)] = cell(d, make)
    # the table: mean (spread over seeds) of each metric per model and attack
    for metric in ("harmful_loss", "refusal_rate", "harm_overlap", "harmless_loss"):
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
    flat = {name: {k if isinstance(k, str) else f"lr{k[0]:g}-n{k[1]}-s{k[2]}": v for k, v in r.items()}
            for name, r in results.items()}
    (out / "grid.json").write_text(json.dumps({"data": a.data, "lrs": lrs, "ns": ns, "seeds": seeds,
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
