"""How much the world model's captions lower its flow-matching loss (`evaluate.caption_loss_gap`).

    python benchmarks/world_caption_gap.py [--weights PATH ...] [--batches 6] [--clips 8]
    python benchmarks/world_caption_gap.py --context [--batches 3] [--clips 16]
    python benchmarks/world_caption_gap.py --twins [--clips 48] [--weights PATH ...]
    python benchmarks/world_caption_gap.py --twins --baseline near_miss     # the negative branch's preference

For each checkpoint (default: the shipped `small` weights): the loss on held-out packed batches with
each clip's own captions, with another clip's captions and with the null caption, the same noise for
all three. A gap of a few percent means the model draws what the context implies and has learnt little
from the text (`docs/benchmarks.md`, "World model evaluation"). CPU, about a minute per checkpoint.

``--context`` instead measures how much the clean chunk before a chunk lowers its loss, by the chunk's
flow time (`evaluate.context_loss_gap`: held-out 2-chunk clips, the second chunk with the first clean
before it and alone, the same noise, time position and caption).

``--twins`` instead measures whether text guidance favours drawing the subject twice
(`evaluate.copy_preference`): how much more a caption lowers the loss on the first chunk of twin clips
(the named object drawn twice) than on normal clips, at the noisy flow times where guidance acts. A
positive preference means guidance away from the null caption pulls toward copies; training with
uncaptioned twin clips (`magi train --p-twin`) should drive it down. About 2 minutes per checkpoint (48 clips,
3 draws, 2 threads). ``--baseline near_miss`` measures the gain over the caption's near misses instead
(what ``cfg_neg`` guides away from; clips told a "moves X" caption only, about 4 minutes).
"""
import argparse
import json

import torch

from maskc.world_model import evaluate
from maskc.world_model.checkpoint import load_checkpoint
from maskc.world_model.generate import DEFAULT_WEIGHTS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="+", default=[str(DEFAULT_WEIGHTS)], help="checkpoints to compare")
    ap.add_argument("--batches", type=int, default=None, help="held-out batches (default 6; 3 with --context)")
    ap.add_argument("--clips", type=int, default=None, help="clips of 4 chunks per batch (default 8; 16 of 2 chunks with --context)")
    ap.add_argument("--context", action="store_true",
                    help="the context gap instead: loss with the clean chunk before vs alone, by flow time "
                         "(clips of 2 chunks; defaults --batches 3 --clips 16)")
    ap.add_argument("--twins", action="store_true",
                    help="the copy preference instead: the caption's gain on twin clips minus on normal clips "
                         "(first chunks, flow times 0.1 0.2 0.3; --clips default 48)")
    ap.add_argument("--draws", type=int, default=3, help="with --twins: noise draws per clip and flow time (default 3)")
    ap.add_argument("--baseline", choices=evaluate.COPY_BASELINES, default="null",
                    help="with --twins: what the caption's gain is measured against: the null caption (text "
                         "guidance) or its near-miss captions (negative guidance) (default null)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    if args.twins and args.context:
        ap.error("--twins and --context measure different things: pass one")
    if args.twins:
        clips = 48 if args.clips is None else args.clips
        head, places = {}, 5

        def measure(model):
            return evaluate.copy_preference(model, clips=clips, draws=args.draws, baseline=args.baseline)
    elif args.context:
        batches = 3 if args.batches is None else args.batches
        clips = 16 if args.clips is None else args.clips
        if batches < 1 or clips < 1:
            raise SystemExit(f"--batches and --clips must be >= 1, got {batches} and {clips}")
        head, places = {"batches": batches, "clips": clips}, 4

        def measure(model):
            return evaluate.context_loss_gap(model, batches=batches, clips=clips)
    else:
        batches = 6 if args.batches is None else args.batches
        clips = 8 if args.clips is None else args.clips
        if batches < 1 or clips < 2:
            raise SystemExit(f"--batches must be >= 1 and --clips >= 2 (a caption must come from another clip), "
                             f"got {batches} and {clips}")
        head, places = {}, 4

        def measure(model):
            return evaluate.caption_loss_gap(model, batches=batches, clips=clips)
    torch.set_num_threads(args.threads)
    for path in args.weights:
        model, _, _ = load_checkpoint(path)
        try:
            res = measure(model)
        except ValueError as e:
            ap.error(str(e))
        print(json.dumps({"weights": path, **head, **_rounded(res, places)}))


def _rounded(res: dict, places: int) -> dict:
    """``res`` with its floats, and the floats of its lists, rounded to ``places`` (one JSON line per checkpoint)."""
    def r(v):
        return round(v, places) if isinstance(v, float) else v

    return {k: [r(x) for x in v] if isinstance(v, list) else r(v) for k, v in res.items()}

if __name__ == "__main__":
    main()
