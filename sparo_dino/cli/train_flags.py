"""Command-line flags of main_dino.py: every official DINO flag with its name and default, plus SPARO's.

Flags are declared once here so that main_dino.py, the submitit launcher and the tests parse the same thing
(`parse_train_args(argv)`), and a `--config FILE.yaml` can set any of them (see sparo_dino/cli/config.py).
"""
from __future__ import annotations

import argparse
from typing import NoReturn, Sequence

import torch

from sparo_dino.cli import errors as cli_errors
from sparo_dino.cli.config import bool_flag, parse_args, read_config
from sparo_dino.cli.errors import require_writable_dirs
from sparo_dino.data import augmentation
from sparo_dino.data.datasets import DATASETS, FASHION_MNIST_DIR
from sparo_dino.data.loader import AUGMENTATION_ALIASES, AUGMENTATIONS, canonical_augmentation
from sparo_dino.distributed import add_launcher_args, check_launcher_args
from sparo_dino.model import registry
from sparo_dino.model.backbone import POS_EMBED_INTERPOLATIONS
from sparo_dino.train import knn_monitor
from sparo_dino.train.optim import OPTIMIZERS
from sparo_dino.train.run_state import RESUME_FREE_KEYS, RESUME_MUST_MATCH_KEYS
from sparo_dino.train.step import COMPILE_CHOICES, PRECISIONS, resolve_precision


def auto_or_bool(value: str | bool) -> str:
    """`auto`, or a true/false flag (also YAML's booleans) spelled `true`/`false`."""
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    return "true" if bool_flag(value) else "false"


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli_errors.ArgumentParser(prog="main_dino.py", allow_abbrev=False,
                                       description="DINO self-supervised training with a SPARO read-out",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="vit_small", choices=registry.archs(),
                       help="backbone: vit_<size>[_<read-out>]; *_sparo replaces the last block with SPARO")
    model.add_argument("--patch_size", default=16, type=int, help="ViT patch size in pixels")
    model.add_argument("--img_size", default=224, type=int,
                       help="image size of the position-embedding grid (other crop sizes are resampled)")
    model.add_argument("--pos_embed_interpolation", default="dino", choices=POS_EMBED_INTERPOLATIONS,
                       help="position embeddings of crops with another patch grid (96 px local crops): dino = "
                            "official DINO's bicubic interpolation, timm = timm's antialiased resampling")
    model.add_argument("--out_dim", default=65536, type=int,
                       help="DINO head output dimension; use a few thousand on small datasets, where 65536 "
                            "prototypes leave the loss stuck at ln(out_dim)")
    model.add_argument("--norm_last_layer", default=True, type=bool_flag,
                       help="fix the weight-norm magnitude of the head's last layer (more stable)")
    model.add_argument("--momentum_teacher", default=0.996, type=float,
                       help="base EMA momentum of the teacher, cosine-scheduled to --final_momentum_teacher")
    model.add_argument("--final_momentum_teacher", default=1.0, type=float,
                       help="teacher momentum at the end of the cosine (DINOv2's name; official DINO fixes it at 1). "
                            "Below 1, a short run's teacher keeps following the student instead of freezing")
    model.add_argument("--use_bn_in_head", default=False, type=bool_flag, help="batch norm in the DINO head MLP")
    model.add_argument("--drop_path_rate", default=0.1, type=float, help="stochastic depth of the student")
    model.add_argument("--grad_checkpointing", default=False, type=bool_flag,
                       help="recompute block activations in backward to save memory")
    model.add_argument("--pretrained_trunk", default=None, type=str, metavar="FILE",
                       help="start a fresh run from this ViT's trunk (official DINO checkpoint or backbone, timm state "
                            "dict or .safetensors, this repository's checkpoint: its teacher): blocks 1..N-1 and the "
                            "final norm load, the block a read-out replaces is dropped, read-out and head start fresh")
    suffixes = ", ".join(f"_{name}" for name in registry.names() if name != "cls")
    readout = parser.add_argument_group(f"read-out options (the read-out is the arch's suffix: {suffixes}; none = CLS)")
    for name, option in registry.OPTIONS.items():
        readout.add_argument(f"--{name}", default=option.default,
                             type=bool_flag if isinstance(option.default, bool) else int,
                             help=f"{option.help} ({registry.takers(name)})")

    temperature = parser.add_argument_group("teacher temperature")
    temperature.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                             help="initial teacher temperature (linearly warmed up to --teacher_temp)")
    temperature.add_argument("--teacher_temp", default=0.04, type=float,
                             help="final teacher temperature; above 0.07 training tends to be unstable")
    temperature.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                             help="epochs of teacher temperature warmup")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast precision; auto = bf16 on GPUs with native bf16 (compute capability >= 8), fp16 "
                            "with a gradient scaler on older GPUs, fp32 on CPU")
    optim.add_argument("--use_fp16", default=None, type=bool_flag,
                       help="official DINO flag: when given, true means --precision fp16 and false fp32")
    optim.add_argument("--compile", default="auto", type=auto_or_bool, choices=COMPILE_CHOICES,
                       help="torch.compile student, teacher and loss; auto = true on GPUs (on CPUs compiling takes "
                            "minutes)")
    optim.add_argument("--weight_decay", default=0.04, type=float, help="initial weight decay")
    optim.add_argument("--weight_decay_end", default=0.4, type=float, help="final weight decay (cosine)")
    optim.add_argument("--clip_grad", default=3.0, type=float,
                       help="maximal gradient norm per parameter; 0 disables clipping")
    optim.add_argument("--batch_size_per_gpu", default=64, type=int, help="images per process and step")
    optim.add_argument("--epochs", default=100, type=int, help="number of training epochs")
    optim.add_argument("--freeze_last_layer", default=1, type=int,
                       help="epochs during which the head's last layer is not updated")
    optim.add_argument("--freeze_trunk_epochs", default=0, type=int,
                       help="with --pretrained_trunk: train only the read-out and the DINO head in the first N epochs")
    optim.add_argument("--lr", default=0.0005, type=float,
                       help="peak learning rate for a total batch of 256 (scaled linearly with the batch)")
    optim.add_argument("--warmup_epochs", default=10, type=int, help="epochs of linear learning-rate warmup")
    optim.add_argument("--min_lr", default=1e-6, type=float, help="final learning rate (cosine)")
    optim.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer")
    optim.add_argument("--fused_adamw", default=True, type=bool_flag,
                       help="AdamW as one fused kernel per device (GPUs and CPUs) instead of torch's foreach kernels: "
                            "the same update up to float rounding; false is the reference path")

    crops = parser.add_argument_group("multi-crop")
    crops.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.0),
                       help="area range of the two global crops")
    crops.add_argument("--local_crops_number", type=int, default=8, help="number of local crops (0 disables)")
    crops.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4),
                       help="area range of the local crops")
    crops.add_argument("--global_crop_size", type=int, default=224, help="global crop size in pixels")
    crops.add_argument("--local_crop_size", type=int, default=96, help="local crop size in pixels")
    crops.add_argument("--augmentation", default="auto", choices=(*AUGMENTATIONS, *AUGMENTATION_ALIASES),
                       help="how the crops are made, on any device: per_image = PIL per image in the data-loader "
                            "workers (the reference), batched = workers only decode, each batch is cropped at once "
                            "on the training device; auto = batched on GPUs, else per_image; the former names cpu "
                            "and gpu mean per_image and batched")

    run = parser.add_argument_group("data and run")
    run.add_argument("--dataset", default="imagefolder", choices=DATASETS, help="training data format")
    run.add_argument("--data_path", default=None, type=str,
                     help=f"ImageFolder root of the training images, or the Fashion-MNIST IDX folder "
                          f"(default for fashion_mnist: {FASHION_MNIST_DIR})")
    run.add_argument("--output_dir", default=".", type=str, help="checkpoints, logs and the resolved config")
    run.add_argument("--saveckp_freq", default=20, type=int,
                     help="also keep checkpointNNNN.pth when the 0-based epoch index is a multiple of this")
    run.add_argument("--ckpt_every_iters", default=0, type=int,
                     help="also overwrite checkpoint.pth every N iterations (with the position inside the epoch), "
                          "so a hard kill loses at most N steps; 0: only at epoch ends and on SIGTERM/SIGUSR1")
    run.add_argument("--skip_bad_images", default=False, type=bool_flag,
                     help="replace unreadable images by the next readable one and count them per epoch in "
                          "log.txt, instead of stopping with an error naming the file")
    run.add_argument("--resume", default=None, type=str,
                     help="checkpoint to start from when --output_dir has no checkpoint.pth yet")
    run.add_argument("--resume_overrides", default=[], nargs="+", metavar="FLAG",
                     help="continue this output dir's run with new values of these flags (names without --, e.g. "
                          "epochs lr, or world_size for another number of processes); without it a rerun whose "
                          "recipe differs from its checkpoint's stops and lists the differences")
    run.add_argument("--train_subset", default=None, type=int, metavar="N",
                     help="train on at most N images of --data_path: a fixed random subset drawn from --seed, the "
                          "same at every resume (small runs on a CPU); default: all")
    run.add_argument("--seed", default=0, type=int, help="random seed")
    run.add_argument("--num_workers", default=10, type=int, help="data-loading workers per process")
    run.add_argument("--print_freq", default=10, type=int, help="console log every N iterations")
    run.add_argument("--tensorboard", default=False, type=bool_flag,
                     help="also write TensorBoard scalars to OUTPUT_DIR/tensorboard (needs `tensorboard`)")
    run.add_argument("--wandb_project", default=None, type=str, metavar="NAME",
                     help="also log what TensorBoard gets, and the run's config and provenance, to this Weights & "
                          "Biases project (needs `wandb`; WANDB_MODE=offline keeps it in OUTPUT_DIR/wandb)")
    knn = parser.add_argument_group("periodic k-NN monitor (weighted 20-NN of the teacher, as eval_knn.py)")
    knn.add_argument("--knn_every", default=0, type=int,
                     help="run the k-NN after every N-th epoch and the last one, logged as knn_top1; 0 disables")
    knn.add_argument("--knn_data_path", default=None, type=str,
                     help="labelled data in --dataset's format: a folder with train/ and val/ ImageFolders, or "
                          "the Fashion-MNIST IDX folder (default for fashion_mnist: --data_path)")
    knn.add_argument("--knn_subset", default=5000, type=int,
                     help="at most this many images of each split (a fixed random subset), to keep the monitor cheap")
    knn.add_argument("--knn_crop_size", default=None, type=int,
                     help="centre crop of the monitor's images, as eval_knn.py --crop_size (default: "
                          "--global_crop_size); set it when a run trains at another resolution than it is evaluated")
    knn.add_argument("--knn_resize_size", default=None, type=int,
                     help="resize before the centre crop, as eval_knn.py --resize_size (default: the crop x 256/224)")
    add_launcher_args(parser)
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """A flag value the validation refuses: one line naming it, exit status 2 as for argparse's own errors (whose
    line adds where to look, `--help`; this message already says what to change)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


# (flag, lowest allowed value, whether the lowest value itself is allowed): values outside make no run at all. lr 0
# is a run that does not learn, on purpose: --pretrained_trunk's check that a run keeps the file's trunk exactly.
_FLOAT_BOUNDS = (("lr", 0.0, True), ("min_lr", 0.0, True), ("weight_decay", 0.0, True),
                 ("weight_decay_end", 0.0, True), ("clip_grad", 0.0, True), ("teacher_temp", 0.0, False),
                 ("warmup_teacher_temp", 0.0, False), ("drop_path_rate", 0.0, True))


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Reject inconsistent flags with one line each, before any process group or file is created."""
    try:
        check_launcher_args(args)
    except ValueError as error:
        _fail(parser, str(error))
    unknown = sorted(set(args.resume_overrides) - set(vars(args)) - {"world_size"})
    if unknown:
        _fail(parser, f"--resume_overrides: unknown flag(s) {', '.join(unknown)}; valid: world_size, "
                      f"{', '.join(sorted(set(vars(args)) - RESUME_FREE_KEYS - set(RESUME_MUST_MATCH_KEYS)))}")
    args.augmentation = canonical_augmentation(args.augmentation)  # the resolved config says today's name
    if args.data_path is None:
        if args.dataset != "fashion_mnist":
            _fail(parser, "--data_path is required for --dataset imagefolder")
        args.data_path = FASHION_MNIST_DIR
    _drop_config_readout_options(args)
    try:
        registry.reject_readout_options(args.arch, [f"--{key}" for key, option in registry.OPTIONS.items()
                                                    if getattr(args, key) != option.default])
        registry.check_readout_sizes(vars(args), prefix="--")
    except ValueError as error:
        _fail(parser, str(error))
    for name in ("batch_size_per_gpu", "epochs", "out_dim", "print_freq", "patch_size", "img_size", "knn_subset"):
        if getattr(args, name) < 1:
            _fail(parser, f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.train_subset is not None and args.train_subset < 1:
        _fail(parser, f"--train_subset must be >= 1, got {args.train_subset}")
    for name, lowest, inclusive in _FLOAT_BOUNDS:
        value = getattr(args, name)
        if not (value >= lowest if inclusive else value > lowest):
            _fail(parser, f"--{name} must be {'>=' if inclusive else '>'} {lowest:g}, got {value:g}")
    if args.drop_path_rate >= 1:
        _fail(parser, f"--drop_path_rate must be < 1 (the share of residual branches dropped), got "
                      f"{args.drop_path_rate:g}")
    try:
        scales = augmentation.check_multicrop_args(**augmentation.multicrop_kwargs(vars(args)))
    except ValueError as error:
        _fail(parser, f"--{error}")
    args.global_crops_scale, args.local_crops_scale = (list(scale) for scale in scales)
    args.knn_crop_size = args.global_crop_size if args.knn_crop_size is None else args.knn_crop_size
    if args.knn_resize_size is None:
        args.knn_resize_size = round(args.knn_crop_size * augmentation.EVAL_RESIZE_RATIO)
    for name in ("global_crop_size", "local_crop_size", "img_size", "knn_crop_size"):
        if getattr(args, name) % args.patch_size:
            _fail(parser, f"--{name} {getattr(args, name)} is not divisible by --patch_size {args.patch_size}")
    if args.knn_every and args.dataset == "imagefolder":
        try:
            knn_monitor.require_labelled_data(args.data_path, args.knn_data_path)
        except ValueError as error:
            _fail(parser, str(error))
    if args.knn_every and args.knn_data_path is None:
        args.knn_data_path = args.data_path  # the IDX folder holds the labelled train and test splits too
    for name in ("knn_crop_size", "knn_resize_size"):
        if getattr(args, name) < 1:
            _fail(parser, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("num_workers", "saveckp_freq", "warmup_epochs", "freeze_last_layer",
                 "warmup_teacher_temp_epochs", "ckpt_every_iters", "knn_every", "freeze_trunk_epochs"):
        if getattr(args, name) < 0:
            _fail(parser, f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.warmup_epochs > args.epochs or args.warmup_teacher_temp_epochs > args.epochs:
        _fail(parser, f"warmup epochs (lr {args.warmup_epochs}, teacher temp {args.warmup_teacher_temp_epochs}) "
                      f"cannot exceed --epochs {args.epochs}")
    if args.freeze_trunk_epochs and args.pretrained_trunk is None:
        _fail(parser, "--freeze_trunk_epochs needs --pretrained_trunk (a random trunk would stay random)")
    if args.freeze_trunk_epochs > args.epochs:
        _fail(parser, f"--freeze_trunk_epochs {args.freeze_trunk_epochs} cannot exceed --epochs {args.epochs}")
    if args.pretrained_trunk is not None and args.resume is not None:
        _fail(parser, "--pretrained_trunk starts a run from a trunk, --resume continues a checkpoint: give one")
    for name in ("momentum_teacher", "final_momentum_teacher"):
        if not 0 <= getattr(args, name) <= 1:
            _fail(parser, f"--{name} must be in [0, 1], got {getattr(args, name)}")
    _warn_surprising(args)
    try:
        resolve_precision(args.precision, args.use_fp16, torch.device("cpu"))
        require_writable_dirs({"--output_dir": args.output_dir})
    except ValueError as error:
        _fail(parser, str(error))
    return args


def _drop_config_readout_options(args: argparse.Namespace) -> None:
    """`--config sparo.yaml --arch vit_tiny` (a baseline from a SPARO recipe): the YAML's read-out options do not
    apply to the arch given on the command line; they go back to their defaults, and one line says so. A YAML whose
    own arch rejects its options stays an error (reject_readout_options)."""
    if args.config is None:
        return
    values = read_config(args.config)
    if values.get("arch", args.arch) == args.arch:
        return
    takes = registry.split_arch(args.arch)[1].options
    dropped = [key for key in registry.OPTIONS
               if key in values and key not in takes and getattr(args, key) == values[key]]
    if dropped:
        cli_errors.warn(f"--arch {args.arch} overrides {args.config}'s arch {values['arch']}; its "
                        f"{', '.join(dropped)} do not apply to {args.arch} and are ignored")
        for key in dropped:
            setattr(args, key, registry.OPTIONS[key].default)


def _warn_surprising(args: argparse.Namespace) -> None:
    """One line for each flag value that is legal but likely a mistake; the run goes on."""
    if args.freeze_last_layer > args.epochs:
        cli_errors.warn(f"--freeze_last_layer {args.freeze_last_layer} exceeds --epochs {args.epochs}: the head's "
                        "last layer is never trained")
    if args.local_crops_number and args.local_crop_size > args.global_crop_size:
        cli_errors.warn(f"--local_crop_size {args.local_crop_size} is larger than --global_crop_size "
                        f"{args.global_crop_size}: DINO's local crops are the small views")


def parse_train_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags from defaults < --config YAML < command line, validated."""
    parser = get_args_parser()
    return validate(parse_args(parser, argv), parser)
