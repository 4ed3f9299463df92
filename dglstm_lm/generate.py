"""`make generate ckpt=<checkpoint or run dir>`: sample text from a trained model.

make generate ckpt=outputs/runs/<date>/<time>_dglstm temperature=0.8 length=60 seed=3 prompt='the company'
"""

from __future__ import annotations

import math
import sys

import torch

from . import checkpoint as ckpt
from .data import EOS, UNK
from .errors import ArgumentParser, CheckpointError, ConfigError, cli


@torch.no_grad()
def sample(
    model, vocab: list[str], length: int, temperature: float = 1.0, prompt: str = "", seed: int = 1
) -> list[str]:
    """Words sampled after <eos> + prompt; an <eos> in the output ends a sentence."""
    index = {w: i for i, w in enumerate(vocab)}
    unknown = [w for w in prompt.split() if w not in index]
    if unknown and UNK not in index:
        raise ConfigError(f"prompt word {unknown[0]!r} is not in the vocabulary")
    ids = [index[EOS]] + [index.get(w, index.get(UNK)) for w in prompt.split()]
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    state = model.init_state(1, device)
    logits, state = model(torch.tensor(ids, device=device).view(-1, 1), state)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[-1, 0].float().cpu() / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(vocab[nxt])
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return out


@cli
def main(argv=None) -> int:
    p = ArgumentParser(prog="make generate", description=__doc__.splitlines()[0])
    p.add_argument(
        "--ckpt", required=True, help="a checkpoint file, or a run directory (uses checkpoints/best.pt)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--length", type=int, default=50, help="words to sample")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prompt", default="", help="words to start from (lower-case PTB tokens)")
    args = p.parse_args(argv)
    if not args.ckpt:
        raise CheckpointError("no checkpoint given: make generate ckpt=<checkpoint file or run dir>")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"temperature must be positive and finite, got {args.temperature}")
    if args.length <= 0:
        raise ConfigError(f"length must be positive, got {args.length}")
    target = ckpt.resolve(args.ckpt, prefer=ckpt.BEST)
    from .evaluate import load_model

    model, _, state = load_model(target)
    known = set(state["vocab"])
    unknown = [w for w in args.prompt.split() if w not in known]
    if unknown and UNK in known:  # the model reads them as <unk>; say so (PTB's words are lower-case)
        print(
            f"note: not in the vocabulary, read as {UNK}: {', '.join(map(repr, unknown))}"
            + (" (PTB's words are lower-case)" if any(w != w.lower() for w in unknown) else ""),
            file=sys.stderr,
        )
    words = sample(model, state["vocab"], args.length, args.temperature, args.prompt, args.seed)
    text = (
        " ".join(([args.prompt] if args.prompt else []) + words).replace(f" {EOS} ", "\n").replace(EOS, "\n")
    )
    print(text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
