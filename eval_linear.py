"""Linear probe on a frozen DINO (+SPARO) backbone.

    python -m torch.distributed.run --nproc_per_node=8 eval_linear.py --pretrained_weights out/checkpoint.pth \
        --data_path /imagenet

Features: the unnormalized SPARO encoding for *_sparo archs (paper C.2); for baselines the final-norm CLS of the last
--n_last_blocks blocks (4, official ViT-S recipe), plus the mean patch token with --avgpool_patchtokens true.
Official protocol: RandomResizedCrop + flip, SGD momentum 0.9, weight decay 0, cosine over --epochs, lr x batch/256,
checkpoint each epoch (an interrupted probe resumes). `--fast` trains the same classifier on cached centre-crop
features instead (no augmentation; labelled FAST MODE in every output). Prints
`Linear probe result [<protocol>]: Top1: X, Top5: Y, ...` and writes results_linear.json to the output folder.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import sparo_vit
from sparo_dino import augmentation, config, distributed, features, linear_probe, provenance

DEFAULT_N_LAST_BLOCKS = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    features.add_feature_args(parser)
    group = parser.add_argument_group("linear probe")
    group.add_argument("--n_last_blocks", type=int, default=None,
                       help=f"baselines: concatenate the CLS of the last n blocks (default {DEFAULT_N_LAST_BLOCKS})")
    group.add_argument("--avgpool_patchtokens", type=config.bool_flag, default=False,
                       help="baselines: also concatenate the mean of the last block's patch tokens")
    group.add_argument("--epochs", type=int, default=100)
    group.add_argument("--lr", type=float, default=0.001, help="base lr, scaled by total batch / 256")
    group.add_argument("--val_freq", type=int, default=1, help="validate every n epochs (and after the last)")
    group.add_argument("--fast", action="store_true",
                       help="train on cached centre-crop features (no augmentation): quick, NOT the official protocol")
    group.add_argument("--seed", type=int, default=0)
    return parser


def kind_resolver(args: argparse.Namespace) -> Callable[[str], str]:
    """arch -> feature kind; the baseline-only flags are an error on a SPARO arch (they would do nothing)."""
    def kind_for(arch: str) -> str:
        if sparo_vit.is_sparo_arch(arch):
            if args.n_last_blocks is not None or args.avgpool_patchtokens:
                raise ValueError(f"--n_last_blocks/--avgpool_patchtokens apply to baseline archs; {arch} is probed "
                                 "on its SPARO encoding")
            return features.feature_kind(arch)
        return features.feature_kind(arch, args.n_last_blocks or DEFAULT_N_LAST_BLOCKS, args.avgpool_patchtokens)
    return kind_for


def _output_dir(args: argparse.Namespace, tag: str, protocol: str) -> str:
    if args.output_dir is not None:
        return args.output_dir
    prefix = "linear_fast" if protocol == "fast" else "linear"
    return os.path.join(features.default_output_dir(args), f"{prefix}_{tag}")


def run_official(args: argparse.Namespace, info: distributed.DistInfo) -> tuple[dict[str, Any], str]:
    """Official protocol: augmented images through the frozen backbone every step, all ranks."""
    backbone, options, tag = features.load_backbone(args)
    backbone.to(info.device)
    kind = kind_resolver(args)(options["arch"])
    featurize = features.feature_function(backbone, kind)
    # Augmentation seeded per (seed, epoch, sample): a resumed probe sees the crops it would have seen.
    train_set, val_set = features.build_splits(args, augmentation.linear_train_transform(args.crop_size),
                                               augmentation.eval_transform(args.resize_size, args.crop_size))
    train_set = augmentation.SeededDataset(train_set, args.seed)
    with torch.no_grad():
        dim = featurize(torch.zeros(1, 3, args.crop_size, args.crop_size, device=info.device)).shape[1]
    torch.manual_seed(args.seed)
    classifier = linear_probe.LinearClassifier(dim, len(train_set.classes)).to(info.device)
    model = classifier
    if info.world_size > 1:
        model = DistributedDataParallel(classifier, device_ids=[info.device] if info.device.type == "cuda" else None)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=args.seed)
    pin = info.device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=args.batch_size_per_gpu, sampler=sampler,
                              num_workers=args.num_workers, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                            sampler=features.ShardSampler(len(val_set), info.rank, info.world_size), pin_memory=pin)

    def train_batches(epoch: int):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        return train_loader

    total_batch = args.batch_size_per_gpu * info.world_size
    lr = linear_probe.scaled_lr(args.lr, total_batch)
    run = {"protocol": "official", "kind": kind, "dim": dim, "num_classes": len(train_set.classes), "tag": tag,
           "epochs": args.epochs, "lr": lr, "total_batch_size": total_batch, "options": options}
    output_dir = _output_dir(args, tag, "official")
    os.makedirs(output_dir, exist_ok=True)
    results = linear_probe.fit(classifier, train_batches, lambda: val_loader, featurize,
                               num_classes=run["num_classes"], epochs=args.epochs, lr=lr, val_freq=args.val_freq,
                               output_dir=output_dir, run=run, device=info.device, reduce=True, model=model)
    return {**results, "run": run}, output_dir


def run_fast(args: argparse.Namespace, info: distributed.DistInfo) -> tuple[dict[str, Any], str] | None:
    """Fast mode: features extracted once (all ranks), classifier trained on the main process."""
    data = features.compute_features(args, info.device, kind_resolver(args))
    if data is None:
        return None
    train_features = data.train_features.to(info.device)
    train_labels = data.train_labels.to(info.device)
    torch.manual_seed(args.seed)
    classifier = linear_probe.LinearClassifier(train_features.shape[1], data.num_classes).to(info.device)

    def train_batches(epoch: int):
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        return linear_probe.tensor_batches(train_features, train_labels, args.batch_size_per_gpu, generator)

    def val_batches():
        return linear_probe.tensor_batches(data.val_features, data.val_labels, args.batch_size_per_gpu)

    lr = linear_probe.scaled_lr(args.lr, args.batch_size_per_gpu)
    run = {"protocol": "fast", "kind": data.meta["kind"], "dim": train_features.shape[1],
           "num_classes": data.num_classes, "tag": data.meta["tag"], "epochs": args.epochs, "lr": lr,
           "total_batch_size": args.batch_size_per_gpu, "options": data.meta["options"]}
    output_dir = _output_dir(args, data.meta["tag"], "fast")
    os.makedirs(output_dir, exist_ok=True)
    results = linear_probe.fit(classifier, train_batches, val_batches, lambda x: x, num_classes=data.num_classes,
                               epochs=args.epochs, lr=lr, val_freq=args.val_freq, output_dir=output_dir, run=run,
                               device=info.device, reduce=False)
    return {**results, "run": run}, output_dir


def summary_line(results: dict[str, Any]) -> str:
    final, best = results["final"], results["best"]
    protocol = linear_probe.PROTOCOLS[results["run"]["protocol"]]
    return (f"Linear probe result [{protocol}]: Top1: {final['top1']:.2f}, Top5: {final['top5']:.2f}, "
            f"best Top1: {best['top1']:.2f} (epoch {best['epoch']})")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = config.parse_args(build_parser(), argv)
    if args.epochs < 1 or args.val_freq < 1:
        raise ValueError("--epochs and --val_freq must be >= 1")
    if not args.fast and (args.load_features or args.dump_features):
        raise ValueError("--load_features/--dump_features need --fast: the official protocol augments every step")
    info = distributed.init_distributed()
    try:
        outcome = run_fast(args, info) if args.fast else run_official(args, info)
        if outcome is None or not distributed.is_main_process():
            return None
        results, output_dir = outcome
        results["provenance"] = provenance.collect(config.args_to_dict(args), {"world_size": info.world_size})
        print(summary_line(results), flush=True)
        config.save_config(args, output_dir, name="config_linear.yaml")
        features.write_results(results, os.path.join(output_dir, "results_linear.json"))
        return results
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    features.run_cli(main)
