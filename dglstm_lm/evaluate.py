"""`make eval ckpt=<checkpoint or run dir>`: perplexity of a checkpoint on valid and test.

Uses the data and batching the run was trained with; PTB is found as for training (data.dir, PTB_DIR, data/).
Reading a checkpoint while its run is still writing is safe: checkpoints are replaced by atomic renames.
"""

from __future__ import annotations

import json
import sys

from . import checkpoint as ckpt
from .config import config_from_dict
from .errors import ArgumentParser, CheckpointError, DataError, cli
from .runtime import keep_freed_memory


def load_model(path, device="cpu"):
    """(model, config, state) from a checkpoint file or run directory."""
    from .models import build_model

    state = ckpt.load(ckpt.resolve(path), map_location=device, require=ckpt.MODEL_KEYS)
    cfg = config_from_dict(state["config"])
    if hasattr(cfg.model, "backend"):
        cfg.model.backend = "auto"  # the fastest loop for this device: every backend computes the same model
    model = build_model(len(state["vocab"]), cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model in its config ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), cfg, state


def evaluate_checkpoint(
    path, data_dir: str | None = None, splits=("valid", "test"), device: str = "auto", full: bool = False
) -> dict:
    """Perplexity per split, over the batches the run evaluated: the whole split, or its first
    trainer.limit_eval_batches batches for a run that set that (smoke runs), unless `full`."""
    from .data import make_batches, prepare_from_config
    from .runtime import resolve_device
    from .trainer import evaluate_batches, ppl

    dev = resolve_device(device, "--device")
    model, cfg, state = load_model(path, dev)
    if data_dir:
        cfg.data.dir = data_dir
    corpus = prepare_from_config(cfg.data)
    if corpus.vocab.words != state["vocab"]:
        raise DataError(
            f"the corpus at {corpus.source} has a different vocabulary than {path} was trained on"
        )
    t = cfg.trainer
    limit = None if full else t.limit_eval_batches
    results = {
        "checkpoint": str(ckpt.resolve(path)),
        "epoch": state["epoch"],
        "step": state["step"],
        "limit_eval_batches": limit,
    }
    for split in splits:
        batches = make_batches(corpus, split, cfg.data.batching, t.eval_batch_size, t.bptt, shuffle=False)
        # the trainer's own evaluation over the same batches: the same number for the same weights
        nll, ntok = evaluate_batches(model, batches, dev, limit, progress=sys.stderr.isatty(), desc=split)
        results[f"{split}/ppl"] = ppl(nll / ntok)
        results[f"{split}/tokens"] = ntok
    return results


@cli
def main(argv=None) -> int:
    p = ArgumentParser(prog="make eval", description=__doc__.splitlines()[0])
    p.add_argument(
        "--ckpt", required=True, help="a checkpoint file, or a run directory (uses checkpoints/best.pt)"
    )
    p.add_argument("--data-dir", help="folder with the PTB files, if not where the run found them")
    p.add_argument("--split", default="valid,test", help="comma-separated splits (default: valid,test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument(
        "--full",
        action="store_true",
        help="whole splits even if the run evaluated only its first trainer.limit_eval_batches batches",
    )
    args = p.parse_args(argv)
    keep_freed_memory()  # as a run does (runtime.py)
    from .models.kernels import wgrad_choice
    from .models.loss import loss_choice

    wgrad_choice()  # a bad $DGLSTM_WGRAD or $DGLSTM_LOSS: one line before anything is loaded
    loss_choice()
    if not args.ckpt:
        raise CheckpointError("no checkpoint given: make eval ckpt=<checkpoint file or run dir>")
    target = ckpt.resolve(args.ckpt, prefer=ckpt.BEST)
    from .runtime import resolve_device

    resolve_device(args.device, "--device")  # before the checkpoint is read
    splits = [s for s in args.split.split(",") if s]
    if not splits:
        raise DataError(f"--split {args.split!r}: no split named (train, valid, test)")
    for s in splits:
        if s not in ("train", "valid", "test"):
            raise DataError(f"unknown split {s!r} (train, valid, test)")
    res = evaluate_checkpoint(target, args.data_dir, splits, args.device, full=args.full)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"checkpoint {res['checkpoint']} (epoch {res['epoch']}, step {res['step']})")
        if res["limit_eval_batches"]:
            print(
                f"first {res['limit_eval_batches']} batches of each split, as the run evaluated "
                "(trainer.limit_eval_batches); whole splits: make eval ... full=1"
            )
        for s in splits:
            print(f"{s:<6} ppl {res[f'{s}/ppl']:.2f}  ({res[f'{s}/tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
