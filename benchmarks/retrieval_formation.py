"""How many steps does a quickstart-sized model need before it retrieves from its context?

The quickstart's retrieval claims (needle, SynL lookup) need the model to copy from
earlier in its context. This script trains a model of the quickstart's shape (a
Llama-style decoder: RMSNorm, RoPE, SwiGLU; plain PyTorch, so the steps are cheap) on
three synthetic tasks side by side, with the same seed, batch and learning rate, and
prints the argmax accuracy on the tokens that can only be predicted by copying:

- ``fixed``: a random segment repeated at a fixed distance (a positional copy);
- ``random``: the same segment repeated at a random distance (a content match: what
  induction heads do, and what the needle test needs);
- ``needle``: one key -> 7-digit value fact among random tokens, asked again at the end
  (the needle test's shape with no other digit in the context);
- ``chunks``: a random source (the first quarter), then chunks of ``--segment`` tokens copied
  from random offsets of it (mostly copy targets: the copy forms about 3 times sooner);
- ``prev`` ("x M x": copy the token before a marker, a previous-token head's task) and
  ``random+prev`` (``random`` with a quarter of ``prev`` samples, measured on ``random``).

    python benchmarks/retrieval_formation.py --steps 600

The variables that move these curves run side by side with ``--variants`` (each variant
overrides flags; every task runs once per variant, same seed and batches): where the loss
falls (``loss=all`` every token, ``loss=copy`` the copy targets only), the alphabet size
(``vocab``), ``batch``, ``lr``, ``layers``, attention-only blocks (``ffn=0``) vs SwiGLU, the
initialisation (``init_std``: N(0, std) as Megatron's init_method_std, 0 = PyTorch's default;
``embed_std`` for the embedding alone), ``norm`` (rms / layer), the lr ``warmup``, ``seed``,
and the output layer: ``out_vocab`` rows beyond the task's alphabet (a real tokenizer's size),
``tie``, ``head_bias``, ``adam_eps``, and ``expand_at`` (grow from the alphabet's rows to
``out_vocab`` at that step):

    python benchmarks/retrieval_formation.py --tasks random --vocab 64 --batch 32 --segment 24 \
        --layers 2 --loss copy --variants "ffn=0,init_std=0;ffn=384,init_std=0;ffn=0,init_std=0.05"

Results in benchmarks/RESULTS.md ("Retrieval formation at quickstart size").
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    _, _, t, hd = x.shape
    inv = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    angle = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def make_norm(kind: str, d: int) -> nn.Module:
    return nn.LayerNorm(d) if kind == "layer" else nn.RMSNorm(d)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, norm: str = "rms"):
        super().__init__()
        self.heads = heads
        self.norm1 = make_norm(norm, d)
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.ffn = ffn  # 0: attention only (no MLP)
        if ffn:
            self.norm2 = make_norm(norm, d)
            self.gate_up, self.down = nn.Linear(d, 2 * ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        if not self.ffn:
            return x
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ffn: int, std: float,
                 embed_std: float = -1.0, norm: str = "rms", out_vocab: int = 0, tie: int = 0,
                 head_bias: int = 0):
        """``std`` > 0: every matrix drawn from N(0, std) and the projections into the residual
        stream from N(0, std / sqrt(2 layers)), as the quickstart's model (model/init.py);
        0: PyTorch's default init (uniform, std 1/sqrt(3 fan_in) for a linear layer, N(0, 1)
        for the embedding). ``embed_std`` >= 0 overrides the embedding's std alone."""
        super().__init__()
        vocab = max(vocab, out_vocab)  # out_vocab: a real tokenizer's size, of which the task uses vocab
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn, norm) for _ in range(layers))
        self.norm, self.head = make_norm(norm, d), nn.Linear(d, vocab, bias=bool(head_bias))
        if std > 0:
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    residual = name.endswith(("out.weight", "down.weight"))
                    nn.init.normal_(p, std=std / (2 * layers) ** 0.5 if residual else std)
        if embed_std >= 0:
            nn.init.normal_(self.embed.weight, std=embed_std)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


PREV_SHARE = 0.25
@torch.no_grad()
def expand_vocabulary(model: "Decoder", size: int, std: float, embed_std: float) -> None:
    old_embed, old_head = model.embed.weight, model.head.weight
    n, d = old_embed.shape
    embed = nn.Embedding(size, d)
    nn.init.normal_(embed.weight, std=embed_std if embed_std >= 0 else std)
    embed.weight[:n] = old_embed
    head = nn.Linear(d, size, bias=False)
    nn.init.normal_(head.weight, std=std)
    head.weight[:n] = old_head
    model.embed, model.head = embed, head


DIGITS = 10  # token ids 0-9 are digits in the needle task; 10 is "is", 11 the query mark


def make_sample(task: str, rng: random.Random, seq: int, vocab: int, segment: int) -> tuple[list[int], list[bool]]:
    """Token ids (seq + 1) and which targets can only be predicted by copying."""
    if task == "needle":
        key = [rng.randrange(12, 62) for _ in range(2)]
        value = [rng.randrange(DIGITS) for _ in range(7)]
        fact, query = key + [10] + value, [11] + key + [10] + value
        noise = [rng.randrange(62, vocab) for _ in range(seq + 1 - len(fact) - len(query))]
        at = rng.randrange(len(noise) + 1)
        ids = noise[:at] + fact + noise[at:] + query
        copy = [False] * (len(ids) - len(value)) + [True] * len(value)
        return ids, copy
    if task == "prev":  # "x M x": after the marker, copy the token before it (a previous-token head)
        marker = vocab - 1
        ids = [rng.randrange(vocab - 1) for _ in range(seq + 1)]
        copy = [False] * (seq + 1)
        for at in range(2, seq + 1, 6):
            ids[at - 1], ids[at] = marker, ids[at - 2]
            copy[at] = True
        return ids, copy
    if task == "chunks":  # a random prefix, then chunks of it copied from random offsets
        source = seq // 4
        segment = min(segment, source)
        ids = [rng.randrange(vocab) for _ in range(source)]
        copy = [False] * source
        while len(ids) < seq + 1:
            at = rng.randrange(source - segment + 1)
            n = min(segment, seq + 1 - len(ids))
            ids += ids[at:at + n]
            copy += [False] + [True] * (n - 1)
        return ids, copy
    if task == "random+prev":  # the random repeat, and a share of "prev" samples
        if rng.random() < PREV_SHARE:
            return make_sample("prev", rng, seq, vocab, segment)
        return make_sample("random", rng, seq, vocab - 1, segment)
    ids = [rng.randrange(vocab) for _ in range(seq + 1)]
    if task == "fixed":
        start = rng.randrange(seq + 1 - 2 * segment + 1)
        again = start + segment
    else:
        start = rng.randrange(seq + 1 - 2 * segment + 1)
        again = rng.randrange(start + segment, seq + 1 - segment + 1)
    ids[again:again + segment] = ids[start:start + segment]
    copy = [again < i < again + segment for i in range(seq + 1)]
    return ids, copy


def train(task: str, args: argparse.Namespace) -> list[tuple[int, float]]:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    expand = args.expand_at > 0 and args.out_vocab > args.vocab
    model = Decoder(args.vocab, args.hidden, args.layers, args.heads, args.ffn, args.init_std,
                    args.embed_std, args.norm, 0 if expand else args.out_vocab, args.tie, args.head_bias)

    def optimizer():
        return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                 eps=args.adam_eps)

    opt = optimizer()
    curve = []
    for step in range(1, args.steps + 1):
        if expand and step == args.expand_at:
            # The vocabulary grows to out_vocab: the task's rows are kept, the others drawn fresh.
            expand_vocabulary(model, args.out_vocab, args.init_std, args.embed_std)
            opt = optimizer()
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        ids, copy = zip(*(make_sample(task, rng, args.seq, args.vocab, args.segment) for _ in range(args.batch)))
        ids, copy = torch.tensor(ids), torch.tensor(copy)
        logits = model(ids[:, :-1])
        if args.loss == "copy":  # only the targets that copying can predict
            target = copy[:, 1:]
            loss = F.cross_entropy(logits[target], ids[:, 1:][target])
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0:
            if "+" in task:  # a mixed task is measured on a fresh batch of its main task alone
                main = task.split("+")[0]
                ids, copy = zip(*(make_sample(main, rng, args.seq, args.vocab - 1, args.segment)
                                  for _ in range(args.batch)))
                ids, copy = torch.tensor(ids), torch.tensor(copy)
                with torch.no_grad():
                    logits = model(ids[:, :-1])
            target = copy[:, 1:]
            accuracy = (logits.argmax(-1)[target] == ids[:, 1:][target]).float().mean().item()
            curve.append((step, accuracy))
            if args.verbose:
                print(f"  {task} step {step}: {accuracy:.3f}", flush=True)
    return curve


VARIABLES = ("expand_at", "adam_eps", "loss", "vocab", "out_vocab", "tie", "head_bias", "batch", "lr", "layers", "ffn", "init_std", "embed_std", "norm", "warmup",
             "segment", "seed")


def parse_variants(spec: str) -> list[dict]:
    """``"loss=all;loss=copy,vocab=64"`` -> one dict of overrides per variant."""
    variants = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        overrides = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in VARIABLES:
                raise SystemExit(f"unknown variable {key!r} in --variants (known: {', '.join(VARIABLES)})")
            overrides[key] = value.strip() if key in ("loss", "norm") \
                else float(value) if key in ("lr", "init_std", "embed_std", "adam_eps") else int(value)
        variants.append(overrides)
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="fixed,random,needle")
    p.add_argument("--variants", default="",
                   help="';'-separated variants, each 'var=value,...' over the flags below "
                        f"({', '.join(VARIABLES)}); each task runs once per variant, side by side")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--segment", type=int, default=48, help="repeated segment length (fixed, random)")
    p.add_argument("--vocab", type=int, default=512, help="alphabet size (symbols the copy must match)")
    p.add_argument("--loss", choices=("all", "copy"), default="all",
                   help="loss on every token, or on the copy targets only")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=384, help="SwiGLU width; 0 = attention-only blocks")
    p.add_argument("--init-std", type=float, default=0.02, help="N(0, std) init; 0 = PyTorch's default init")
    p.add_argument("--embed-std", type=float, default=-1.0,
                   help="N(0, std) for the embedding alone; < 0: as the other matrices")
    p.add_argument("--out-vocab", type=int, default=0,
                   help="embedding and output size when larger than --vocab (a real tokenizer's)")
    p.add_argument("--expand-at", type=int, default=0,
                   help="train with --vocab rows until this step, then grow to --out-vocab rows")
    p.add_argument("--head-bias", type=int, default=0, help="1: the output layer has a bias")
    p.add_argument("--tie", type=int, default=0, help="1: the output layer is the embedding")
    p.add_argument("--norm", choices=("rms", "layer"), default="rms")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print each measurement as it is taken")
    args = p.parse_args()
    tasks = args.tasks.split(",")
    variants = parse_variants(args.variants) or [{}]
    columns, curves, seconds = [], {}, {}
    for overrides in variants:
        run = argparse.Namespace(**{**vars(args), **overrides})
        label = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
        for task in tasks:
            name = f"{task} [{label}]" if len(variants) > 1 else task
            columns.append(name)
            start = time.perf_counter()
            curves[name] = train(task, run)
            seconds[name] = time.perf_counter() - start
            print(f"{name}: " + " ".join(f"{s}:{a:.3f}" for s, a in curves[name]) +
                  f" ({seconds[name]:.0f} s)", flush=True)
    print(f"copy-target accuracy (argmax); flags: batch {args.batch} x {args.seq}, lr {args.lr}, "
          f"{args.layers} layers x {args.hidden}, ffn {args.ffn}, init_std {args.init_std}, "
          f"vocab {args.vocab}, loss {args.loss}")
    print("| step | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for i, (step, _) in enumerate(curves[columns[0]]):
        print(f"| {step} | " + " | ".join(f"{curves[c][i][1]:.3f}" for c in columns) + " |")
    print("| seconds | " + " | ".join(f"{seconds[c]:.0f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
