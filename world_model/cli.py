"""The ``magi`` command line of the world model: ``magi train``, ``magi generate``, ``magi eval``,
``magi finetune-decoder``.

Subcommands live in `COMMANDS` (name -> `Command`: help, description, argument builder, runner),
so every subcommand registers the same way. Errors a user can cause (an unknown
config, a negative step count, a missing checkpoint, a CUDA device on a machine without one) print
``magi <command>: error: ...`` after the usage line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from maskc.cli import nonneg_int, positive_int

PROG = "magi"


@dataclass(frozen=True)
class Command:
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]
    epilog: str = ""


# ----------------------------------------------------------------------------------- train

TRAIN_DESCRIPTION = """\
Train the MAGI-1-style world model from scratch on the synthetic world (coloured shapes moving
with simple physics, one caption per one-second chunk), streamed on the fly: no data set to
download. Two phases run one after the other; a run is fully determined by its config and seed.

phase 1, the video autoencoder (--steps-vae steps):
  one random 24-frame chunk of each clip is encoded to 6 x 8 x 8 latents and decoded back;
  loss = reconstruction MSE + a small KL term. Then the latents are normalised to unit variance
  (set_latent_stats) and the autoencoder is frozen.

phase 2, the diffusion transformer + caption encoder (--steps-dit steps), flow matching:
  clips are cut into samples of different lengths and packed into one sequence (MAGI-1's packed
  block-causal attention mask); within a sample the noise levels are monotone (earlier chunks
  cleaner); some samples start with clean chunks (continuation) or a clean first frame
  (image-to-video); 10% drop their captions (classifier-free guidance); each chunk reads only its
  own caption; the loss covers the noisy chunks only.

Outputs in --out: model.safetensors (weights + configs: the file to ship and to generate from),
ckpt_<step>.safetensors (+ .optim.safetensors) to resume from, log.jsonl (loss, lr, grad norm,
seconds per step, tokens), train_config.json. Progress bars show phase, step, loss and tokens/s.
"""

TRAIN_EPILOG = """\
configs:
  tiny    CPU smoke test: 20 + 30 steps at batch 2 x 2 chunks in well under a minute (useless model)
  small   the shipped model: about 45 minutes on one H100 (bf16 autocast, compiled blocks and encoder on CUDA;
          pass --threads 2 beside its 8 data workers)
  PATH    a .json file with TrainConfig fields (see world_model/train_configs/small.json for all of them)

examples:
  magi train --config tiny --out runs/tiny                      # CPU smoke test
  magi train --config small --out runs/small --device cuda --threads 2   # the shipped model
  magi train --config tiny --steps-vae 0 --steps-dit 10 --out runs/t   # random frozen autoencoder
  magi train --resume runs/small --out runs/small               # continue from the latest checkpoint
  magi train --resume runs/small/ckpt_0004000.safetensors --steps-dit 8000 --out runs/small-long
  magi train --resume runs/small --config small --p-scheduled 0.5 --steps-dit 11600 --out runs/small   # scheduled clips
  magi train --resume world_model/weights/small.safetensors --config small --caption-runs 4 \\
      --p-scheduled 0.5 --steps-dit 11600 --stop-at 12152 --out runs/runs4   # tell captions their runs
  magi train --resume small-12152.safetensors --config small --p-scheduled 0.5 --steps-dit 14000 \\
      --t-mean -0.35 --t-std 1.4 --stop-at 13142 --out runs/tw --device cuda   # the shipped weights' last fine-tune
  magi train --resume world_model/weights/small.safetensors --p-twin 0.15 --steps-dit 15000 \\
      --out runs/twin --device cuda   # twin clips: against guidance's preference for drawing the subject twice

resume continues bit-exactly (on the CPU) from the saved step: weights, optimizer moments and the
data stream position are restored; only the step counts and bookkeeping (--ckpt-every,
--data-workers) may change, and changing a step count changes the learning-rate schedule.
Fine-tuning with another loss or data mix: --resume with a larger --steps-dit and a changed
"fg_weight" (extra loss weight on the latent cells an object touches; 0 = plain MSE) or --p-scheduled
(the fraction of clips scripted from random chunk-wise prompt schedules, data.generate_scheduled;
--p-lookahead of them planned over the whole schedule, the rest chunk by chunk), or other noise
levels (--t-mean, --t-std: the shipped transformer's last 990 steps drew them from sigmoid(N(-0.35,
1.4)), more at both ends, and its videos keep their objects better; small-12152.safetensors is the
weights before, `git show 8210aa5:world_model/weights/small.safetensors`).
A weights file that holds its training config (the shipped one does) can be resumed: AdamW then
starts from zero moments. --caption-runs R adds caption runs to a model trained without them (the
new vectors start at zero, so training starts from the same function); --stop-at STEP remakes a run
that a time limit stopped, at the same step.
"""


_nonneg_int = nonneg_int
_pos_int = positive_int


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="tiny|small|PATH.json",
                   help="training config: a bundled name or a JSON file (required unless --resume)")
    p.add_argument("--steps-vae", type=_nonneg_int, metavar="N",
                   help="autoencoder steps (default: the config's; 0 keeps a random frozen autoencoder)")
    p.add_argument("--steps-dit", type=_nonneg_int, metavar="N",
                   help="transformer steps (default: the config's)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto = cuda when available, else cpu (default: auto)")
    p.add_argument("--resume", metavar="CKPT|DIR",
                   help="continue from a ckpt_<step>.safetensors, or from the latest one in a run directory")
    p.add_argument("--seed", type=_nonneg_int, metavar="S", help="seed of the model init, data and noise")
    p.add_argument("--batch", type=_pos_int, metavar="B", help="clips per transformer step")
    p.add_argument("--ckpt-every", type=_nonneg_int, metavar="N", help="steps between checkpoints (0: phase ends only)")
    p.add_argument("--data-workers", type=_nonneg_int, metavar="N", help="processes generating batches ahead")
    p.add_argument("--p-scheduled", type=_nonneg_float, metavar="P",
                   help="fraction of the transformer's training clips scripted from random chunk-wise prompt "
                        "schedules (runs of one caption that the clip is planned to satisfy; default: the config's)")
    p.add_argument("--p-lookahead", type=_nonneg_float, metavar="P",
                   help="fraction of the scheduled clips planned over the whole schedule; the rest are planned "
                        "chunk by chunk, a run's later chunks slowing down near a wall (default: the config's)")
    p.add_argument("--p-twin", type=_nonneg_float, metavar="P",
                   help="fraction of the transformer's training clips that are twin clips: one object drawn twice "
                        "(same colour, shape, size and motion), shown uncaptioned, so that guidance away from the "
                        "unconditional branch steers away from drawing the subject twice (default: the config's, 0)")
    p.add_argument("--caption-runs", type=_pos_int, metavar="R",
                   help="tell each chunk's caption for how many chunks (up to R, this one included) the video keeps "
                        "it, so a chunk can leave room for what the caption still asks; with --resume of a model "
                        "without runs their vectors start at zero (default: the config's)")
    p.add_argument("--t-mean", type=_float, metavar="MU",
                   help="noise levels: each noisy chunk's flow time is sigmoid(N(MU, SIGMA)) (t = 0 noise, 1 clean); "
                        "a negative MU trains more at the noisy end, where a chunk's layout is decided "
                        "(default: the config's, 0; the shipped model's last fine-tune: -0.35)")
    p.add_argument("--t-std", type=_pos_float, metavar="SIGMA",
                   help="spread of the noise levels' normal (default: the config's, 1; a wider one trains more at "
                        "both ends; the shipped model's last fine-tune: 1.4)")
    p.add_argument("--run-lr-scale", type=_pos_float, metavar="X",
                   help="learning rate of the caption-run vectors, as a multiple of the transformer's (new vectors "
                        "added to a trained model learn faster with X > 1; default: the config's, 1)")
    p.add_argument("--stop-at", type=_pos_int, metavar="STEP",
                   help="stop before this step (counting both phases), save a checkpoint and the weights; the "
                        "learning-rate schedule stays that of all the steps (remakes a run stopped early)")
    p.add_argument("--time-limit", type=_pos_float, metavar="MIN",
                   help="wall-clock minutes: start no step after this, save a checkpoint of the step reached and "
                        "stop (resume continues bit-exactly); for leased or preemptible machines")
    p.add_argument("--threads", type=_pos_int, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they also turn off off-terminal)")


def _train_config(args, parser):
    """The TrainConfig to run, and the checkpoint to resume (validated, with clear errors)."""
    from .checkpoint import read_checkpoint
    from .train import TrainConfig, check_resume_config, load_train_config, resolve_device, resolve_resume

    try:
        resume, saved, meta, stored = None, None, None, None
        if args.resume is not None:
            resume = resolve_resume(args.resume)
            try:
                _, stored, meta = read_checkpoint(resume)
            except ValueError as e:
                parser.error(f"resume: {e}")
            if meta.get("train_config") is None:
                parser.error(f"resume: {str(resume)!r} holds no training config (a weights-only export?)")
            saved = TrainConfig.from_dict(meta["train_config"])
        if args.config is not None:
            tcfg = load_train_config(args.config)
        elif saved is not None:
            tcfg = saved
        else:
            parser.error("--config is required (tiny, small or a .json path) unless --resume is given")
        overrides = {k: v for k, v in {
            "steps_vae": args.steps_vae, "steps_dit": args.steps_dit, "seed": args.seed, "batch": args.batch,
            "ckpt_every": args.ckpt_every, "data_workers": args.data_workers,
            "p_scheduled": args.p_scheduled, "p_lookahead": args.p_lookahead, "p_twin": args.p_twin,
            "run_lr_scale": args.run_lr_scale, "t_mean": args.t_mean, "t_std": args.t_std}.items() if v is not None}
        tcfg = replace(tcfg, **overrides)
        if args.caption_runs is not None:
            base = stored if stored is not None and args.config is None else tcfg.model_config()
            tcfg = replace(tcfg, model=replace(base, caption_runs=args.caption_runs).to_dict())
        if saved is not None:
            check_resume_config(tcfg, saved, meta, stored)
        device = resolve_device(args.device)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return tcfg, resume, device


def run_train(args, parser) -> int:
    import torch

    from .train import train

    tcfg, resume, device = _train_config(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = False if args.no_progress else None
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    result = train(tcfg, args.out, device=device, resume=resume, progress=progress,
                   log=None if progress is None and sys.stderr.isatty() else say,
                   time_limit=None if args.time_limit is None else 60.0 * args.time_limit, stop_at=args.stop_at)
    last = {ph: losses[-1][1] for ph, losses in result.losses.items() if losses}
    print(f"trained {tcfg.model_config().name}: step {result.step} of {tcfg.total_steps} in {result.seconds:.1f} s"
          + "".join(f"; last {ph} loss {v:.4f}" for ph, v in last.items()))
    print(f"weights: {result.final}")
    if result.checkpoints:
        print(f"resume with: {PROG} train --resume {result.checkpoints[-1]} --out {args.out}")
    return 0


# -------------------------------------------------------------------------------- generate

GENERATE_DESCRIPTION = """\
Generate a video chunk by chunk (one chunk = 24 frames of 64x64 = one second) with the trained
world model, MAGI-1 style: --window chunks are denoised at once with staggered noise levels (each
takes --steps flow-matching steps, each drawing --eta of its noise afresh), a sliding chunk window
of attention, and a bounded KV cache of finished chunks, so memory does not grow with the video
length. Each chunk is decoded and appended to --out as soon as its frames are final (the shipped
decoder reads one latent frame ahead: a chunk once the next is final, the last at the end).

conditioning:
  --prompt TEXT      one per chunk, in order (repeat the option); the last prompt repeats
  --prompts FILE     chunk-wise prompts: a JSON list of {"chunks": n, "prompt": "..."}, or the same in
                     YAML (FILE.yaml / FILE.yml)
  --image IMG        image-to-video: a 64x64 RGB image becomes the clean first latent frame
  --video PREFIX     continue a video (.gif, a folder of .png frames, or .mp4 with imageio-ffmpeg);
                     its last whole chunks are the context and are written before the new ones

guidance (classifier-free, at the flow times of --cfg-interval): --cfg-text pushes each chunk towards
its prompt and away from no prompt; --cfg-neg away from its negative prompts, by default the
captions that start as the prompt does and end otherwise ("moves right" -> "bounces off the right
wall"; "moves up" -> also "rises", "rises and falls"), or --negative-prompt per chunk. Measured
on held-out direction-change videos: prompt following 0.817 -> 0.875 with --cfg-neg 8 (the default).

device: a CUDA GPU when torch sees one (--device), where each step's guidance branches run as one
packed transformer call (--pack-branches) replayed from a CUDA graph of its layout (--cuda-graphs):
16 chunks at 299 frames/s on an H200 in a warmed process (102 packed but eager, 31 one call per
branch; a fresh process's first video pays some 8 s of first-use work); on the CPU one call each,
about 9.5 frames/s with one thread.

output: .mp4 through imageio + imageio-ffmpeg when installed, else a .gif (Pillow) beside it;
a path without .mp4/.gif is a folder of PNG frames. The format written is printed.
"""

GENERATE_EPILOG = """\
examples:
  magi generate --prompt "the red circle moves right" --chunks 8 --out out.mp4
  magi generate --prompt "the red circle moves right" --prompt "the red circle moves left" --chunks 4 --out turn.gif
  magi generate --prompts prompts.json --out story.gif --seed 3
  magi generate --prompts prompts.yaml --out story.gif --seed 3
  magi generate --image first.png --prompt "the blue square falls" --chunks 2 --out i2v.gif
  magi generate --prompt "the red circle moves up" --negative-prompt "the red circle moves left" --out up.gif
  magi generate --prompt "the red circle moves up" --cfg-neg 0 --out up_plain.gif   # no negative guidance
  magi generate --prompt "the red circle moves up" --eta 0 --out up_euler.gif   # Euler steps (the sampler before session 30)
  magi generate --image first.png --prompt "the blue square moves left" --chunks 16 --cfg-local 0 --out plain.gif
      # plain guidance everywhere (the default before session 35): objects persist less
  magi generate --image first.png --prompt "the blue square moves left" --also "the red circle falls" \\
      --chunks 16 --out kept.gif   # every object named: the red circle is kept too
  magi generate --image first.png --prompt "the blue square moves left" --also auto \\
      --chunks 16 --out auto.gif   # the stream names them itself, by what it sees them do
  magi generate --video prefix.gif --prompt "the green triangle moves up" --chunks 2 --out more.gif
  magi generate --prompt "the red circle moves right" --chunks 64 --device cuda --out long.mp4   # on a GPU

prompts.json: [{"chunks": 2, "prompt": "the red circle moves right"}, {"chunks": 2, "prompt": "the red circle moves left"}]
prompts.yaml: - {chunks: 2, prompt: the red circle moves right}
              - {chunks: 2, prompt: the red circle moves left}
captions use the grammar: the COLOUR SHAPE MOTION (e.g. "the yellow square bounces off the floor").
"""


def _also_choice(text: str):
    if text.strip().lower() != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing (the simulator's captions) or auto, got {text!r}")
    return "auto"


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _float(text: str) -> float:
    v = _number(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def _nonneg_float(text: str) -> float:
    v = _number(text)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _pos_float(text: str) -> float:
    v = _nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _unit_float(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return v


AUTO_ON_OFF = {"auto": None, "on": True, "off": False}  # --pack-branches / --cuda-graphs -> generate_chunks


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    from .generate import (
        DEFAULT_CFG_ALSO, DEFAULT_CFG_INTERVAL, DEFAULT_CFG_LOCAL, DEFAULT_CFG_NEG, DEFAULT_CFG_PREV, DEFAULT_CFG_PREV_FRAMES,
        DEFAULT_CFG_SALIENT, DEFAULT_CFG_TEXT, DEFAULT_ETA, DEFAULT_SHIFT, DEFAULT_STEPS, DEFAULT_WINDOW,
    )

    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="caption of the next chunk (repeatable; the last one repeats)")
    p.add_argument("--prompts", metavar="FILE", help='chunk-wise prompts from a JSON file, [{"chunks": n, "prompt": '
                   '"..."}, ...], or the same list in YAML (FILE.yaml / FILE.yml)')
    p.add_argument("--chunks", type=_nonneg_int, metavar="N",
                   help="chunks to generate (default: the number of prompts; 1 second each)")
    p.add_argument("--out", required=True, metavar="PATH", help="output .mp4, .gif, or a folder for PNG frames")
    p.add_argument("--seed", type=_nonneg_int, default=0, metavar="S", help="noise seed (default: 0)")
    p.add_argument("--steps", type=_pos_int, default=DEFAULT_STEPS, metavar="N",
                   help=f"sampler steps per chunk (default: {DEFAULT_STEPS})")
    p.add_argument("--eta", type=_unit_float, default=DEFAULT_ETA, metavar="E",
                   help="fraction of the noise drawn afresh at each step (0: Euler steps on the ODE; more: "
                        "each step may revise the layout so far: fewer duplicated objects and colour changes; "
                        f"default: {DEFAULT_ETA:g})")
    p.add_argument("--window", type=_pos_int, default=DEFAULT_WINDOW, metavar="N",
                   help=f"chunks denoised at once, staggered (default: {DEFAULT_WINDOW}, as MAGI-1)")
    p.add_argument("--attn-window", type=_pos_int, metavar="N",
                   help="sliding chunk window of attention (default: the checkpoint's training setting)")
    p.add_argument("--cfg-text", type=_nonneg_float, default=DEFAULT_CFG_TEXT, metavar="W",
                   help=f"guidance on the text (0 disables; default: {DEFAULT_CFG_TEXT})")
    p.add_argument("--cfg-neg", type=_nonneg_float, default=DEFAULT_CFG_NEG, metavar="W",
                   help="negative guidance, away from each chunk's negative prompt, inside the --cfg-interval "
                        f"(0 disables; default: {DEFAULT_CFG_NEG:g})")
    p.add_argument("--negative-prompt", action="append", metavar="TEXT",
                   help='negative prompt of the next chunk (repeatable; the last one repeats; "none": no negative '
                        'for that chunk). Default: the prompt\'s near misses, "the red circle moves right" -> '
                        '"the red circle bounces off the right wall" ("moves up" also -> "rises", "rises and '
                        'falls"; "moves down" also -> "falls"); none for other motions')
    p.add_argument("--also", action="append", metavar="TEXT",
                   help='caption of another object in the scene, told to every chunk (repeatable, one per object, '
                        'e.g. "the blue square falls"): composed guidance keeps every object named in the picture '
                        '(one more transformer call per --also on the guided steps). With --cfg-local 2 (the default), '
                        '16-chunk image-to-video persistence 0.43 -> 0.50 on 80 held-out videos, prompts followed 2 '
                        'points less; with --cfg-local 0 it adds copies. For --image / --video: from text it costs 8 '
                        'points of prompt following. The prompts name the subject; an --also naming it is an error. '
                        '--also auto (with --image or --video): the stream finds the objects of the picture itself and '
                        'tells each the motion it showed in the latest finished chunk (a motion a few chunks old keeps '
                        'an object as well as the right one)')
    p.add_argument("--cfg-also", type=_nonneg_float, default=DEFAULT_CFG_ALSO, metavar="W",
                   help=f"guidance scale of each --also caption (default: {DEFAULT_CFG_ALSO:g})")
    p.add_argument("--cfg-prev", type=_nonneg_float, default=DEFAULT_CFG_PREV, metavar="W",
                   help=f"guidance on the previous chunks: the new chunk continues what the cache shows (0 disables; "
                        f"default: {DEFAULT_CFG_PREV:g}, which cuts the seams between chunks; one more transformer call per "
                        f"step)")
    p.add_argument("--cfg-prev-frames", type=_nonneg_int, default=DEFAULT_CFG_PREV_FRAMES, metavar="N",
                   help="--cfg-prev acts on each chunk's first N latent frames only, where it meets the chunk before "
                        f"(0: all, which costs image-to-video prompt following; default {DEFAULT_CFG_PREV_FRAMES})")
    p.add_argument("--cfg-interval", type=_nonneg_float, nargs=2, default=DEFAULT_CFG_INTERVAL, metavar=("LO", "HI"),
                   help="flow times (0 noise, 1 clean) at which text and negative guidance act; a frame outside "
                        "them takes the plain conditional velocity (default: %g %g)" % DEFAULT_CFG_INTERVAL)
    p.add_argument("--cfg-local", type=_nonneg_float, default=DEFAULT_CFG_LOCAL, metavar="G",
                   help="keep text and negative guidance where it is strong: each latent position takes the weight "
                        f"(|guidance| / its frame's largest) ** G (default: {DEFAULT_CFG_LOCAL:g}; 0: plain guidance "
                        "everywhere). Measured with the shipped weights on an H200: objects persist better over 16 "
                        "image-to-video chunks (0.45 -> 0.53 of the frames keep every object, 110 held-out videos) "
                        "and seams shrink (1.39 -> 1.35) at the same prompt following of direction changes (0.938 "
                        "against 0.942, 288 videos). The first chunk of a video from nothing takes --cfg-salient instead")
    p.add_argument("--cfg-salient", type=_nonneg_float, default=DEFAULT_CFG_SALIENT, metavar="S",
                   help="in the first chunk of a video from nothing, guide what the model itself draws: each latent "
                        "position takes the weight (d / its frame's largest) ** S, d how far the conditional "
                        "prediction stands out from its frame's mean there (default: "
                        f"{DEFAULT_CFG_SALIENT:g}; 0: plain guidance). Plain guidance drew the subject two or more "
                        "times in 0.69 of the frames of 192 held-out direction-change videos, 2 in 0.48 at the same "
                        "prompt following, 4 in 0.34 at less (H200). No effect with --image / --video")
    p.add_argument("--cfg-run", type=_nonneg_float, default=0.0, metavar="W",
                   help="run guidance, for a model trained with caption runs (magi train --caption-runs): "
                        "amplifies what a prompt that lasts several chunks asks of each chunk, inside the "
                        "--cfg-interval (0 disables; default 0; the shipped model has no runs)")
    p.add_argument("--shift", type=_pos_float, default=DEFAULT_SHIFT, metavar="S",
                   help=f"time-grid shift: > 1 spends more of the steps near the noise, where the layout and the "
                        f"motion are decided (default: {DEFAULT_SHIFT:g})")
    p.add_argument("--image", metavar="IMG", help="image-to-video: a 64x64 RGB image (PNG, ...)")
    p.add_argument("--video", metavar="PREFIX", help="continue this video (.gif, PNG folder, or .mp4)")
    p.add_argument("--weights", metavar="PATH", help="checkpoint (default: the shipped small model)")
    p.add_argument("--threads", type=_pos_int, default=1, metavar="N",
                   help="CPU threads for torch (default: 1, fastest for these small tensors)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="where the model runs (default auto: a CUDA GPU when torch sees one, else the CPU)")
    p.add_argument("--pack-branches", default="auto", choices=tuple(AUTO_ON_OFF),
                   help="run each step's guidance branches (conditional, null text, negatives, previous chunks) as "
                        "one packed transformer call, a maskc mask keeping each branch to its own tokens, instead of "
                        "one call each: the same video up to rounding. auto (default): on a GPU, where it is 3.2x "
                        "the frames/s of 16 chunks on an H200 (102 against 31; 299 with --cuda-graphs); on the CPU "
                        "the dense attention pays for the packed mask's empty blocks, which makes it slower")
    p.add_argument("--cuda-graphs", default="auto", choices=tuple(AUTO_ON_OFF),
                   help="on a GPU, replay each packed transformer call from a CUDA graph of its layout (captured the "
                        "first time a layout comes up): the host then issues one launch where it issued ~350. auto "
                        "(default): with packed branches on a GPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _also_arg(also: list[str] | None, parser):
    """``--also`` as `generate_chunks` takes it: None, "auto" (given alone), or the captions."""
    from .generate import AUTO_ALSO

    if not also:
        return None
    if any(a.strip().lower() == AUTO_ALSO for a in also):
        if len(also) > 1:
            parser.error(f"--also {AUTO_ALSO} finds every object itself: give it alone, not with captions")
        return AUTO_ALSO
    return tuple(also)


def run_generate(args, parser) -> int:
    import torch

    from . import generate as G
    from . import media

    if args.prompt and args.prompts:
        parser.error("give --prompt or --prompts, not both")
    try:
        if args.prompts:
            prompts = G.load_prompt_file(args.prompts)
        elif args.prompt:
            prompts = list(args.prompt)
        else:
            parser.error("give at least one --prompt (or --prompts FILE)")
        n_chunks = len(prompts) if args.chunks is None else args.chunks
        if n_chunks < 1:
            parser.error("--chunks must be >= 1 (zero chunks is an empty video)")
        prompts = G.expand_prompts(prompts, n_chunks)
        negative = None
        if args.negative_prompt:
            negative = [None if q.strip().lower() == "none" else q for q in args.negative_prompt]
        image = video = None
        if args.image is not None:
            image = media.read_image(args.image)
            if image.shape != (64, 64, 3):
                parser.error(f"image {args.image!r} is {image.shape[1]}x{image.shape[0]}; it must be 64x64 RGB")
        if args.video is not None:
            video = media.read_video(args.video)
        if args.weights is not None and not Path(args.weights).is_file():
            parser.error(f"weights {args.weights!r} do not exist")
        from .train import resolve_device

        device = resolve_device(args.device)
        torch.set_num_threads(args.threads)
        model, meta = G.load_model(args.weights, device=str(device))
        stream = G.generate_chunks(model, prompts, n_chunks=n_chunks, steps=args.steps, window=args.window,
                                   attn_window=args.attn_window, cfg_text=args.cfg_text, cfg_prev=args.cfg_prev,
                                   cfg_prev_frames=args.cfg_prev_frames, image=image, video=video, seed=args.seed,
                                   meta=meta, shift=args.shift,
                                   cfg_interval=tuple(args.cfg_interval), cfg_run=args.cfg_run,
                                   negative=negative, cfg_neg=args.cfg_neg, eta=args.eta,
                                   cfg_local=args.cfg_local, cfg_salient=args.cfg_salient,
                                   also=_also_arg(args.also, parser),
                                   cfg_also=args.cfg_also,
                                   pack_branches=AUTO_ON_OFF[args.pack_branches],
                                   cuda_graphs=AUTO_ON_OFF[args.cuda_graphs])
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)

    writer = media.VideoWriter(args.out)
    if getattr(writer, "fallback", False):
        print("note: imageio + imageio-ffmpeg are not installed: writing a GIF instead of an mp4", file=sys.stderr)
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=n_chunks, desc="generate", unit="chunk", disable=True if args.no_progress else None)
    first = True
    try:
        for chunk in stream:
            if first and stream.prefix_frames is not None:
                writer.append(stream.prefix_frames)
            first = False
            writer.append(chunk)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    dt = time.perf_counter() - t0
    what = {"mp4": "mp4 video", "gif": "GIF", "png": "PNG frames (a folder)"}[writer.format]
    calls = f"{stream.model_calls} transformer calls" if stream.model_calls == stream.branch_passes else \
        f"{stream.branch_passes} branch passes packed into {stream.model_calls} transformer calls"
    print(f"generated {n_chunks} chunk(s) ({n_chunks * model.cfg.chunk_frames} frames) on the {device.type.upper()} "
          f"in {dt:.1f} s ({calls}, KV cache at most {stream.peak_cache_chunks} chunk(s))")
    if stream.auto_also:
        seen = ", ".join(f"the {c} {s} ({stream.motions.get((c, s), 'motion not read')})" for c, s in stream.objects)
        print(f"--also auto: objects of the picture, with the motion each last showed: {seen or 'none found'}")
    print(f"wrote {what}: {writer.path} ({writer.frames_written} frames at {writer.fps} fps)")
    return 0


# ------------------------------------------------------------------------------------ eval

EVAL_DESCRIPTION = """\
Evaluate the world model on held-out seeds of the synthetic world (small integers; training uses
large derived seeds) and print a table (also written as JSON with --out):
  prompt following      chunk-wise prompts that change direction mid-video; the subject is tracked
                        by colour and the caption rule is applied to its measured motion, chunk
                        by chunk (frames where it covers under 0.85 of its median pixel count over
                        the chunk are left out: partly covered); the JSON also holds the fraction
                        under the earlier whole-video median (fraction_video_rule)
  image-to-video        PSNR of the first frame vs the image; object persistence: the fraction of
                        frames whose blob count per colour equals the image's, over --image-chunks
                        chunks (16), beside the simulator's own clip and its autoencoder round trip
  continuation physics  2 simulator chunks in, 2 generated: position error vs the simulator,
                        against a copy-last-frame baseline
  chunk seams           mean frame difference at chunk boundaries vs inside chunks
  constant memory       peak host memory and KV-cache bytes for each --memory-chunks; ratio
  throughput            generated frames per second on this machine
"""

EVAL_EPILOG = """\
examples:
  magi eval                                       # seeds 0 1, 4 chunks (a few minutes on a CPU)
  magi eval --seeds 0 1 2 --chunks 4 --out results.json
  magi eval --memory-chunks 4 16 64 --out mem.json
  magi eval --seeds 10 11 12 13 --cfg-text 4      # the same metrics at another text guidance
  magi eval --seeds 10 11 12 13 --cfg-local 0     # ... with plain guidance (the default before session 35)
  magi eval --seeds 10 11 12 13 --cfg-prev 0      # ... without guidance on the previous chunks (before session 37)
  magi eval --seeds 10 11 12 13 --also            # ... image-to-video told every object's caption
"""


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="PATH", help="checkpoint (default: the shipped small model)")
    p.add_argument("--seeds", type=_nonneg_int, nargs="+", default=[0, 1], metavar="S",
                   help="held-out seeds (default: 0 1)")
    p.add_argument("--chunks", type=_pos_int, default=4, metavar="N",
                   help="chunks per prompt-following video (default: 4; >= 2)")
    p.add_argument("--image-chunks", type=_pos_int, default=None, metavar="N",
                   help="chunks per image-to-video video, over which object persistence is counted (default: 16)")
    p.add_argument("--steps", type=_pos_int, metavar="N", help="sampler steps per chunk (default: generate's)")
    p.add_argument("--eta", type=_unit_float, metavar="E",
                   help="fraction of the noise drawn afresh at each sampler step (0: Euler; default: generate's)")
    p.add_argument("--cfg-text", type=_nonneg_float, metavar="W",
                   help="classifier-free guidance scale on the text (default: generate's)")
    p.add_argument("--cfg-local", type=_nonneg_float, metavar="G",
                   help="guidance kept where it is strong, as magi generate --cfg-local (default: generate's; "
                        "0: plain guidance)")
    p.add_argument("--cfg-salient", type=_nonneg_float, metavar="S",
                   help="guidance on what the model draws in the first chunk of a video from nothing, as magi generate "
                        "--cfg-salient (default: generate's; 0: plain guidance)")
    p.add_argument("--cfg-prev", type=_nonneg_float, metavar="W",
                   help="guidance on the previous chunks, as magi generate --cfg-prev (default: generate's; 0: none)")
    p.add_argument("--cfg-prev-frames", type=_nonneg_int, metavar="N",
                   help="the latent frames of each chunk --cfg-prev acts on, as magi generate --cfg-prev-frames "
                        "(default: generate's)")
    p.add_argument("--also", nargs="?", const=True, default=False, type=_also_choice,
                   metavar="auto",
                   help="image-to-video runs are also told every other object's caption (what the simulator's clip "
                        "has it do), as magi generate --also: with --cfg-local 2 (the default), persistence over 16 "
                        "chunks 0.43 -> 0.50 on 80 held-out videos (the weights before session 34; docs/benchmarks.md, "
                        "session 32); --also auto: the captions the stream reads from its own finished chunks, as "
                        "magi generate --also auto")
    p.add_argument("--cfg-neg", type=_nonneg_float, metavar="W",
                   help="negative guidance away from each chunk's near-miss captions (0 disables; default: generate's)")
    p.add_argument("--shift", type=_pos_float, metavar="S", help="time-grid shift of the sampler (default: generate's)")
    p.add_argument("--cfg-interval", type=_nonneg_float, nargs=2, metavar=("LO", "HI"),
                   help="flow times at which text and negative guidance act (default: generate's)")
    p.add_argument("--memory-chunks", type=_pos_int, nargs="+", default=[4, 16], metavar="N",
                   help="video lengths for the memory measurement (default: 4 16)")
    p.add_argument("--out", metavar="FILE.json", help="also write all figures as JSON")
    p.add_argument("--threads", type=_pos_int, default=1, metavar="N", help="CPU threads for torch (default: 1)")


def run_eval(args, parser) -> int:
    import json

    import torch

    from . import evaluate as EV

    if args.chunks < 2:
        parser.error("--chunks must be >= 2 (a direction change needs two chunks)")
    if args.weights is not None and not Path(args.weights).is_file():
        parser.error(f"weights {args.weights!r} do not exist")
    torch.set_num_threads(args.threads)
    try:
        res = EV.evaluate(args.weights, seeds=args.seeds, chunks=args.chunks, steps=args.steps,
                          memory_chunks=args.memory_chunks, log=lambda m: print(m, file=sys.stderr),
                          cfg_text=args.cfg_text, shift=args.shift, cfg_interval=args.cfg_interval,
                          cfg_neg=args.cfg_neg, image_chunks=args.image_chunks, eta=args.eta, also=args.also,
                          cfg_local=args.cfg_local, cfg_prev=args.cfg_prev, cfg_prev_frames=args.cfg_prev_frames,
                          cfg_salient=args.cfg_salient)
    except ValueError as e:
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(EV.format_table(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------ finetune-decoder

FINETUNE_DECODER_DESCRIPTION = """\
Teach a checkpoint's autoencoder decoder to read the chunks before each chunk (--context chunks),
so a chunk's first frames are decoded knowing the chunk before, and write the model to --out (its
last frames see the next chunk only with --delay, below).
A decoder that reads each chunk alone draws a chunk's first and last frames without knowing its
neighbour: that is where most of the seams between generated chunks come from (the simulator's
clips through the autoencoder alone: boundary / inside frame difference 1.64 with one chunk of
context, the simulator's own about 1.0).

--causal also makes the decoder causal inside a clip (past-only temporal convolutions, per-frame
norms; warm-started from the stored decoder): a chunk then continues the chunk before exactly as
the frames inside a chunk continue each other, and a stream carries the decoder's state from chunk
to chunk instead of re-decoding a window. With --context 3 its windows cover its receptive field
(13 latent frames), so training decodes what a stream does. The shipped decoder (session 29): round
trips 1.64 -> 1.17, generated videos 2.06 -> 1.52.

--delay L (a causal decoder) lets it read L latent frames ahead: frame i is drawn from latent frames
up to i // 4 + L, so the last frames of a chunk see how the next chunk starts and the decoder can
ease across the jump the encoder (which encodes each chunk alone) leaves at every chunk boundary.
The cost is latency: a stream emits a chunk once the next is final, and the last when the video ends.
The shipped decoder reads one latent frame ahead (session 36): generated videos' seams 1.35 -> 1.21.

Only the decoder trains, on simulator clips of --clip-chunks chunks (default --context + 1; each
decoded as a stream decodes it, the first chunk alone; AdamW, warmup, cosine). The encoder, the
caption encoder and the transformer are copied unchanged, so generation needs nothing else: `magi
generate` and the Python API give the decoder its context (memory stays constant). Prints the
held-out reconstruction error per frame of a chunk and the held-out round trips' seams, before and
after."""

FINETUNE_DECODER_EPILOG = """\
examples:
  magi finetune-decoder --out small-ctx.safetensors --device cuda --workers 8 --time-limit 1.5   # 981 steps on an H200
  magi finetune-decoder --out causal.safetensors --causal --context 3 --clip-chunks 4 --lr 1e-3 \\
      --device cuda --workers 4 --time-limit 7      # the shipped decoder's first stage (session 29)
  magi finetune-decoder --weights causal.safetensors --out causal2.safetensors --context 3 --clip-chunks 4 \\
      --steps 3000 --lr 5e-4 --device cuda --workers 4 --time-limit 7.6   # its second stage
  magi finetune-decoder --weights causal2.safetensors --out ahead.safetensors --delay 1 --steps 600 --lr 3e-4 \
      --device cuda --workers 4 --time-limit 6       # the shipped decoder's look-ahead (session 36), then:
  magi finetune-decoder --weights ahead.safetensors --out ahead2.safetensors --steps 900 --lr 3e-4 --diff-weight 4 \
      --device cuda --workers 4 --time-limit 5.4
  magi finetune-decoder --weights run/final.safetensors --out ctx.safetensors --steps 20 --batch 2 --held-out 4   # CPU smoke
"""


def add_finetune_decoder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="PATH", help="checkpoint to start from (default: the shipped small model)")
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the fine-tuned checkpoint")
    p.add_argument("--context", type=_pos_int, metavar="N",
                   help="chunks before each chunk the decoder reads (1-4; default 1, or 3 for a causal decoder: the "
                        "chunks its receptive field spans, which it needs)")
    p.add_argument("--causal", action="store_true",
                   help="make the decoder causal (past-only temporal convolutions, per-frame norms; warm-started "
                        "from the stored decoder): a chunk then continues the chunk before as frames inside a chunk do")
    p.add_argument("--clip-chunks", type=_pos_int, metavar="N",
                   help="chunks per training clip, each decoded with its context as a stream does (default: context + 1)")
    p.add_argument("--delay", type=_nonneg_int, metavar="L",
                   help="latent frames a causal decoder reads ahead (default: the stored decoder's): a chunk's last "
                        "frames then see the next chunk's first latents, and a stream emits each chunk once the next "
                        "is final (one chunk later); warm-started from the stored decoder read L latent frames late")
    p.add_argument("--diff-weight", type=float, default=0.0, metavar="W",
                   help="also weigh the error of consecutive frames' differences by W (seams and steps between "
                        "latent frames cost more; default 0: plain MSE)")
    p.add_argument("--steps", type=_pos_int, default=1500, metavar="N", help="optimizer steps (default 1500)")
    p.add_argument("--batch", type=_pos_int, default=16, metavar="N", help="clips per step (default 16)")
    p.add_argument("--lr", type=_pos_float, default=3e-4, metavar="LR", help="peak learning rate (default 3e-4)")
    p.add_argument("--seed", type=_nonneg_int, default=0, metavar="S", help="data and noise seed (default 0)")
    p.add_argument("--held-out", type=_pos_int, default=64, metavar="N",
                   help="held-out clips scored before and after (reconstruction error, round-trip seams; default 64)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto = cuda when available, else cpu (default: auto)")
    p.add_argument("--workers", type=_nonneg_int, default=0, metavar="N",
                   help="processes generating the clips (default 0: in the training process)")
    p.add_argument("--time-limit", type=_pos_float, metavar="MIN", help="stop after this many minutes")
    p.add_argument("--threads", type=_pos_int, metavar="N", help="CPU threads for torch")


def run_finetune_decoder(args, parser) -> int:
    import torch

    from .generate import DEFAULT_WEIGHTS
    from .train import finetune_decoder, resolve_device

    weights = Path(args.weights) if args.weights is not None else DEFAULT_WEIGHTS
    if not weights.is_file():
        parser.error(f"weights {str(weights)!r} do not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        r = finetune_decoder(weights, args.out, context=args.context, steps=args.steps, batch=args.batch, lr=args.lr,
                             seed=args.seed, device=device, workers=args.workers, causal=args.causal,
                             clip_chunks=args.clip_chunks, held_out=args.held_out, diff_weight=args.diff_weight,
                             delay=args.delay,
                             time_limit=None if args.time_limit is None else 60.0 * args.time_limit)
    except ValueError as e:
        parser.error(str(e))
    b, a = r["held_out_mse_by_frame_before"], r["held_out_mse_by_frame_after"]
    print(f"fine-tuned the decoder: {r['steps_done']} steps, training loss {r['loss_first_50']:.5f} -> "
          f"{r['loss_last_50']:.5f}")
    print(f"held-out reconstruction MSE, first / middle / last frame of a chunk: before {b[0]:.5f} / "
          f"{b[len(b) // 2]:.5f} / {b[-1]:.5f}, after {a[0]:.5f} / {a[len(a) // 2]:.5f} / {a[-1]:.5f}")
    print(f"held-out round-trip seams (boundary / inside frame difference): {r['held_out_seams_before']:.3f} -> "
          f"{r['held_out_seams_after']:.3f}; steps where a latent frame starts: "
          f"{r['held_out_latent_steps_before']:.3f} -> {r['held_out_latent_steps_after']:.3f}")
    print(f"weights: {args.out}")
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command(
        help="train the world model (autoencoder, then transformer + caption encoder)",
        description=TRAIN_DESCRIPTION, add_arguments=add_train_arguments, run=run_train, epilog=TRAIN_EPILOG),
    "generate": Command(
        help="generate a video chunk by chunk (streamed to mp4/GIF/PNG frames)",
        description=GENERATE_DESCRIPTION, add_arguments=add_generate_arguments, run=run_generate,
        epilog=GENERATE_EPILOG),
    "eval": Command(
        help="evaluate the model on held-out seeds (prompt following, i2v, physics, seams, memory, speed)",
        description=EVAL_DESCRIPTION, add_arguments=add_eval_arguments, run=run_eval, epilog=EVAL_EPILOG),
    "finetune-decoder": Command(
        help="teach the autoencoder's decoder to read the chunk before each chunk (fewer visible seams)",
        description=FINETUNE_DECODER_DESCRIPTION, add_arguments=add_finetune_decoder_arguments,
        run=run_finetune_decoder, epilog=FINETUNE_DECODER_EPILOG),
}


# ------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            magi: a MAGI-1-style autoregressive video world model built on maskc masks, trained from
            scratch on a synthetic world of moving shapes with one caption per one-second chunk."""),
        epilog=f"run '{PROG} <command> --help' for a command's options and examples")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description, epilog=cmd.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(_command=name, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    return COMMANDS[args._command].run(args, args._parser)


if __name__ == "__main__":
    sys.exit(main())
