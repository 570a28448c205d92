"""What eval_knn.py and eval_linear.py share: their flags, the features they evaluate, their output and errors.

The features of both splits come from --load_features (a cache, checked against the flags) or from the backbone of
--pretrained_weights (io.weights) run over the dataset (eval.extraction), optionally dumped for later
(eval.feature_cache). --test_sets are extracted in the same pass (never cached). Results go next to the
checkpoint unless --output_dir says otherwise; a user's mistake ends the script with one line instead of a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import torch

from sparo_dino import distributed
from sparo_dino.cli import config
from sparo_dino.cli import errors as cli_errors
from sparo_dino.cli.errors import exit_with, print_once, require_writable_dirs
from sparo_dino.data import augmentation, datasets
from sparo_dino.eval import extraction, feature_cache, fewshot, pca, shifted_sets
from sparo_dino.eval.feature_cache import FeatureSet
from sparo_dino.eval.interruption import end_workers_of, interruptible, note_saved
from sparo_dino.io import atomic, weights
from sparo_dino.io.checkpoint import CheckpointError
from sparo_dino.model import registry


def evaluation_parser(doc: str) -> argparse.ArgumentParser:
    """The parser eval_knn.py and eval_linear.py start from: the script's docstring as description, the shared
    feature flags and the official launcher flags."""
    parser = cli_errors.ArgumentParser(description=doc.split("\n\n")[0],
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_feature_args(parser)
    add_robustness_args(parser)
    distributed.add_launcher_args(parser)
    return parser


def add_weight_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags naming a backbone's weights and, for a plain state dict, its architecture (evaluations, export)."""
    group = parser.add_argument_group("weights and architecture")
    group.add_argument("--pretrained_weights", type=str, default=None,
                       help="training checkpoint (with teacher/student/config), export_model.py folder or a plain "
                            "backbone state dict")
    group.add_argument("--checkpoint_key", type=str, default="teacher", choices=weights.TRAINING_KEYS,
                       help="which network of a training checkpoint to evaluate")
    group.add_argument("--arch", type=str, default=None, choices=registry.archs(),
                       help="read from the checkpoint's config; required for a plain state dict")
    group.add_argument("--patch_size", type=int, default=None,
                       help="read from the checkpoint's config; required for a plain state dict")
    group.add_argument("--img_size", type=int, default=None,
                       help="position-embedding grid of the backbone (config; default 224 for a plain state dict)")
    for name, option in registry.OPTIONS.items():
        group.add_argument(f"--{name}", type=config.bool_flag if isinstance(option.default, bool) else int,
                           default=None, help="read-out option, read from the checkpoint's config (plain state dict: "
                                              f"{option.default})")
    return parser


def add_feature_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every evaluation shares: weights, architecture, data, preprocessing, caching, output."""
    add_weight_args(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", type=str, default="imagefolder", choices=datasets.DATASETS)
    group.add_argument("--data_path", type=str, default=None,
                       help="folder with train/ and val/ (imagefolder) or the Fashion-MNIST IDX files")
    group.add_argument("--resize_size", type=int, default=256, help="Resize of the evaluation view")
    group.add_argument("--crop_size", type=int, default=224, help="CenterCrop (and linear RandomResizedCrop) size")
    group.add_argument("--batch_size_per_gpu", type=int, default=128)
    group.add_argument("--num_workers", type=int, default=10)
    group = parser.add_argument_group("caching and output")
    group.add_argument("--dump_features", type=str, default=None,
                       help="save the extracted train/val features to this folder")
    group.add_argument("--dump_format", type=str, default="own", choices=feature_cache.DUMP_FORMATS,
                       help="own: raw features with classes and model (train_features.pth, val_features.pth); "
                            "official: official DINO's L2-normalized trainfeat/testfeat/trainlabels/testlabels.pth; "
                            "both: the two")
    group.add_argument("--load_features", type=str, default=None,
                       help="use features saved by --dump_features (either format, e.g. an official DINO dump) "
                            "instead of running the backbone")
    group.add_argument("--output_dir", type=str, default=None,
                       help="where results go (default: next to the checkpoint, or the features folder)")
    group = parser.add_argument_group("width control")
    group.add_argument("--pca_dim", type=int, default=None,
                       help="evaluate the first N principal components of the features, fitted on the train split "
                            "only (test images never shape them): encodings of different widths compared at one "
                            "width, without retraining; dumps keep the full features")
    return parser


def add_robustness_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Shifted test sets and few-shot tries (docs/evaluation.md, Robustness evaluation); both scripts end with one
    table of them (sparo_dino/eval/results_table.py)."""
    group = parser.add_argument_group("robustness: shifted test sets and few-shot")
    group.add_argument("--test_sets", type=str, nargs="+", default=None, metavar="NAME=PATH",
                       help="also evaluate on these ImageFolders (e.g. imagenet_r=/data/imagenet-r), whose class "
                            "folders are training class names (or all integers: class indices, as ImageNet-V2's); a "
                            "set holding some classes is predicted among those only; features extracted fresh, "
                            "never cached")
    group.add_argument("--n_per_class", type=int, nargs="+", default=None, metavar="N",
                       help="few-shot: also evaluate with N training images per class (several N allowed), drawn "
                            "from the train split only, --fewshot_tries times each (seeded from --seed)")
    group.add_argument("--fewshot_tries", type=int, default=5, help="seeded draws per --n_per_class value")
    return parser


def check_robustness_args(args: argparse.Namespace) -> None:
    """--test_sets and few-shot flags, checked before any process group, weights or images."""
    shifted_sets.parse_specs(args.test_sets)
    if args.test_sets and args.load_features is not None:
        raise ValueError("--test_sets extracts the test sets' features with --pretrained_weights; cached features "
                         "(--load_features) hold train and val only")
    if args.n_per_class is not None and (min(args.n_per_class) < 1 or args.fewshot_tries < 1 or args.seed < 0):
        raise ValueError("--n_per_class values and --fewshot_tries must be >= 1 (and --seed >= 0 for the draws)")


def check_pca_args(args: argparse.Namespace, conflicts: Mapping[str, str]) -> None:
    """--pca_dim must be positive and cannot go with a flag of `conflicts` (flag -> why; "" when it is not set)."""
    if args.pca_dim is None:
        return
    if args.pca_dim < 1:
        raise ValueError(f"--pca_dim must be >= 1, got {args.pca_dim}")
    for flag, reason in conflicts.items():
        if reason:
            raise ValueError(f"--pca_dim cannot go with {flag}: {reason}")


def data_path(args: argparse.Namespace) -> str:
    """--data_path, or the packaged Fashion-MNIST folder for --dataset fashion_mnist."""
    if args.data_path is not None:
        return args.data_path
    if args.dataset == "fashion_mnist":
        return datasets.FASHION_MNIST_DIR
    raise ValueError("--data_path is required for --dataset imagefolder (a folder holding train/ and val/)")


def _check_cached(cached: FeatureSet, args: argparse.Namespace, kind_for: Callable[[str], str],
                  accept_official_dump: bool) -> FeatureSet:
    """Cached features must be the ones this evaluation needs; an official dump records no model, so only the flags
    describe it."""
    if cached.meta["kind"] == feature_cache.OFFICIAL_DUMP_KIND:
        if not accept_official_dump:
            raise ValueError(f"{args.load_features} holds an official DINO dump (L2-normalized features); this "
                             "evaluation needs the raw features: dump them with --dump_format own")
        options = {key: getattr(args, key, None) for key in weights.BACKBONE_OPTION_KEYS
                   if getattr(args, key, None) is not None}
        if "arch" in options:
            kind_for(options["arch"])  # flags that do not apply to the arch are an error here too
        cached.meta["options"] = options
        return cached
    options = cached.meta["options"]
    weights.resolve_model_options(vars(args), options)  # a flag contradicting the cached model is an error here too
    expected = kind_for(options["arch"])
    if cached.meta["kind"] != expected:
        raise ValueError(f"features in {args.load_features} are {cached.meta['kind']!r}, "
                         f"this evaluation needs {expected!r}")
    return cached


def compute_features(args: argparse.Namespace, device: torch.device,
                     kind_for: Callable[[str], str] = extraction.feature_kind, accept_official_dump: bool = False,
                     at_init: bool = False, shard_train: bool = False) -> FeatureSet | None:
    """Features of train and val from --load_features or the backbone (main process gets them, others None).

    `kind_for(arch)` names the features the evaluation needs (default: what k-NN uses); `accept_official_dump`
    says whether L2-normalized features of an unknown model (an official DINO dump) will do, as they do for k-NN.
    `at_init`: features of the run's random-init network (see weights.load_backbone), never cached or dumped.
    `shard_train`: every rank gets a FeatureSet holding its own ShardSampler shard of train (never gathered: the
    ImageNet x SPARO bank is 21 GB) and all of val; meta["train_shard"] says so and counts the whole train set.
    --test_sets: each set's features go to `test_sets` of the result, labelled by training class, gathered as val's."""
    if args.load_features is not None:
        if at_init:
            raise ValueError("the random-init baseline needs --pretrained_weights (a training checkpoint), not "
                             "--load_features")
        if not distributed.is_main_process():
            return None
        cached = _check_cached(feature_cache.load_features(args.load_features), args, kind_for, accept_official_dump)
        fewshot.require_shots(cached.train_labels, getattr(args, "n_per_class", None) or [], cached.classes)
        return reduce_width(cached, args.pca_dim)
    backbone, options, tag = weights.load_backbone(args, at_init)
    backbone.to(device)
    kind = kind_for(options["arch"])
    fn = extraction.feature_function(backbone, kind)
    transform = augmentation.eval_transform(args.resize_size, args.crop_size)
    splits = dict(zip(feature_cache.SPLITS,
                      extraction.build_splits(args.dataset, data_path(args), transform, transform)))
    # before the extraction: a class too small for --n_per_class would otherwise fail after it
    fewshot.require_shots(splits["train"].targets, getattr(args, "n_per_class", None) or [],
                          splits["train"].classes)
    tests = shifted_sets.build(shifted_sets.parse_specs(args.test_sets), splits["train"].classes, transform)
    scopes = {"train": "local", "val": "all"} if shard_train else {"train": "main", "val": "main"}
    results = {split: extraction.extract_features(fn, dataset, args.batch_size_per_gpu, args.num_workers, device,
                                       name=f"{split} features", scope=scopes.get(split, scopes["val"]))
               for split, dataset in {**splits, **{test.spec.name: test.dataset for test in tests}}.items()}
    del backbone, fn
    extraction.release_cached_memory()
    if not distributed.is_main_process() and not shard_train:
        return None
    meta = {"kind": kind, "options": options, "tag": tag, "source": os.path.abspath(args.pretrained_weights),
            "checkpoint_key": args.checkpoint_key, "dataset": args.dataset,
            "resize_size": args.resize_size, "crop_size": args.crop_size}
    if shard_train:
        meta["train_shard"] = {"rank": distributed.get_rank(), "world_size": distributed.get_world_size(),
                               "num_train": len(splits["train"])}
    features = FeatureSet(*results["train"], *results["val"], list(splits["train"].classes), meta)
    features.test_sets = {test.spec.name: shifted_sets.EvalSet(*results[test.spec.name], test.present, test.spec.path)
                          for test in tests}
    if args.dump_features is not None and not at_init:
        feature_cache.save_features(features, args.dump_features, args.dump_format)
        folder = args.dump_features
        note_saved("features", lambda: f"the features in {folder} (--load_features {folder} instead of "
                                       "--pretrained_weights skips their extraction)")
    return reduce_width(features, args.pca_dim)


def reduce_width(features: FeatureSet, pca_dim: int | None) -> FeatureSet:
    """--pca_dim: a copy with every split (and test set) projected on the first pca_dim principal components of the
    train split; meta["pca"] records the width and the train variance kept."""
    if pca_dim is None:
        return features
    if "train_shard" in features.meta:
        raise ValueError("--pca_dim fits the components on the whole train split; not with --shard_bank")
    fitted = pca.fit(features.train_features, pca_dim)
    return dataclasses.replace(
        features, train_features=fitted.project(features.train_features),
        val_features=fitted.project(features.val_features),
        test_sets={name: dataclasses.replace(test, features=fitted.project(test.features))
                   for name, test in features.test_sets.items()},
        meta={**features.meta, "pca": {"dim": pca_dim, "fitted_on": "train", "explained_variance": fitted.explained}})


def default_output_dir(args: argparse.Namespace) -> str:
    """--output_dir, else the checkpoint's folder, else the cached features' folder."""
    if args.output_dir is not None:
        return args.output_dir
    if args.pretrained_weights is not None:
        return os.path.dirname(os.path.abspath(args.pretrained_weights))
    if args.load_features is not None:
        return os.path.abspath(args.load_features)
    raise ValueError("--pretrained_weights is required (or --load_features with cached features)")


def check_output_dirs(args: argparse.Namespace) -> None:
    """The folders an evaluation writes to (results, --dump_features) must take files: checked at start-up, so a
    bad one stops the run before the process group, the weights and the feature extraction."""
    require_writable_dirs({"--output_dir": default_output_dir(args), "--dump_features": args.dump_features})


def write_results(results: Mapping[str, Any], path: str) -> str:
    """Write an evaluation's results JSON (the file scripts parse) and say where it went. Through a temporary name
    and a rename: a kill while writing leaves the previous file whole, never a half JSON that a script chokes on."""
    with atomic.replaced(path) as handle:
        json.dump(results, handle, indent=2)
    print(f"results written to {path}", flush=True)
    return path


# Errors of the evaluation scripts that end them with one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, datasets.BadImageError)


def run_cli(main: Callable[[], Any]) -> None:
    """Run an evaluation entry point; bad input ends with one line naming the problem instead of a traceback (also
    when a data-loader worker raised it and the message carries the worker's traceback), SIGTERM and Ctrl-C with
    one line saying what was saved (sparo_dino/eval/interruption.py)."""
    try:
        with interruptible():
            main()
    except USER_ERRORS as error:
        end_workers_of(error)
        exit_with(error)


def print_user_error(error: BaseException) -> None:
    """The one line of a user's mistake (see run_cli); other errors keep their traceback."""
    if isinstance(error, USER_ERRORS):
        print_once(error)
