"""Linear probe on a frozen DINO (+SPARO) backbone.

    python -m torch.distributed.run --nproc_per_node=8 eval_linear.py --pretrained_weights out/checkpoint.pth \
        --data_path /imagenet

Features: the unnormalized SPARO encoding for *_sparo archs (paper C.2; `--sparo_features encoding+cls` puts the
final-norm CLS of the --n_last_blocks - 1 blocks before SPARO in front of it); for baselines the final-norm CLS of
the last --n_last_blocks blocks (4, official ViT-S recipe), plus the mean patch token with --avgpool_patchtokens true.
Official protocol: RandomResizedCrop + flip, SGD momentum 0.9, weight decay 0, cosine over --epochs, lr x batch/256,
validation on official DINO's epochs, checkpoint each epoch (an interrupted probe resumes). `--fast` trains the same
classifier on cached centre-crop features instead (no augmentation; labelled FAST MODE in every output), with
`--init_baseline` also on the features of the run's random-init network. Prints
`Linear probe result [<protocol>]: best Top1: X (epoch E, ...), final Top1: ...` and writes results_linear.json to
the output folder. `--evaluate` only validates a trained head and prints official DINO's accuracy line.
--test_sets evaluates the final head on shifted test sets, --fast --n_per_class trains few-shot heads on drawn train
features; one table then ends the output (docs/evaluation.md, Robustness evaluation).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from sparo_dino import distributed
from sparo_dino.cli import config, eval_flags
from sparo_dino.data import augmentation
from sparo_dino.eval import extraction, fewshot, interruption, linear_probe, results_table, shifted_sets
from sparo_dino.eval.feature_cache import FeatureSet
from sparo_dino.eval.shifted_sets import VAL_NAME, EvalSet, RestrictedHead
from sparo_dino.eval.subsets import seeded_split
from sparo_dino.io import provenance, weights
from sparo_dino.io.checkpoint import load_checkpoint
from sparo_dino.model import registry
from sparo_dino.run_config import args_to_dict
from sparo_dino.stop_signals import ignore_stop_signals
from sparo_dino.train.schedules import scaled_lr

DEFAULT_N_LAST_BLOCKS = 4
# --fast's base lrs: official 1e-3 and around it, up to where unnormalized SPARO encodings of a short run need it
# (1.0) and beyond: a random-init vit_tiny_attpool's 192 small features need 30 on the Fashion-MNIST demo images,
# where a grid ending at 1.0 still rose at its end (docs/readouts.md, "Equal tuning"); 100 keeps 30 inside.
DEFAULT_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
INIT_BASELINE_DIR = "init_baseline"
FEWSHOT_DIR = "fewshot"  # in a probe's output folder: one resumable head per (n, try)
PROBES = ("linear", "attentive")


def build_parser() -> argparse.ArgumentParser:
    parser = eval_flags.evaluation_parser(__doc__)
    group = parser.add_argument_group("linear probe")
    group.add_argument("--n_last_blocks", type=int, default=None,
                       help=f"CLS archs: concatenate the CLS of the last n blocks; other read-outs with "
                            f"--sparo_features encoding+cls: the CLS of the n-1 blocks before the read-out (default "
                            f"{DEFAULT_N_LAST_BLOCKS})")
    group.add_argument("--avgpool_patchtokens", type=config.bool_flag, default=False,
                       help="baselines: also the mean of the last block's patch tokens")
    group.add_argument("--sparo_features", type=str, default="encoding", choices=extraction.SPARO_FEATURES,
                       help="the encoding alone, or (read-outs replacing the last block; paper C.2) the final-norm "
                            "CLS of the n_last_blocks-1 blocks before the read-out, then the encoding")
    group.add_argument("--num_labels", type=int, default=None,
                       help="official flag: outputs of the classifier; default: the data's classes (another "
                            "value is an error)")
    group.add_argument("--epochs", type=int, default=100)
    group.add_argument("--lr", type=float, default=0.001, help="base lr, scaled by total batch / 256")
    group.add_argument("--val_freq", type=int, default=1,
                       help="validate after 0-based epochs that are multiples of n, and after the last (official)")
    group.add_argument("--evaluate", action="store_true",
                       help="official flag: only validate a trained head (--linear_weights), no training")
    group.add_argument("--linear_weights", type=str, default=None,
                       help=f"head for --evaluate: a probe's {linear_probe.CHECKPOINT_NAME} or official DINO linear "
                            f"weights (default: {linear_probe.CHECKPOINT_NAME} in the output folder)")
    group.add_argument("--fast", action="store_true",
                       help="train on cached centre-crop features (no augmentation): quick, NOT the official protocol")
    group.add_argument("--lr_grid", type=float, nargs="+", default=list(DEFAULT_LR_GRID),
                       help="--fast: base lrs (x batch / 256) of heads trained side by side in one pass; the best on "
                            "a train hold-out is reported; one value trains one head on all train features")
    group.add_argument("--holdout_fraction", type=float, default=0.1,
                       help="--fast with several --lr_grid values: share of the train features that chooses the lr")
    group.add_argument("--probe", type=str, default="linear", choices=PROBES,
                       help="linear: a linear classifier on the features above; attentive (with --fast): one "
                            "cross-attention pooling layer and a linear classifier on all final-norm tokens of the "
                            "trunk, cached like the features (docs/evaluation.md, Attentive probe)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--init_baseline", action="store_true",
                       help="--fast: also probe the network the run started from (same config and seed, random init) "
                            "on the same images with the same lr grid and hold-out, and report the difference")
    return parser


def kind_resolver(args: argparse.Namespace) -> Callable[[str], str]:
    """arch -> feature kind; flags that would do nothing for the arch are an error."""
    n_last_blocks = args.n_last_blocks or DEFAULT_N_LAST_BLOCKS

    def kind_for(arch: str) -> str:
        if args.probe == "attentive":  # every arch: the trunk's tokens (checked against the flags in check_args)
            return extraction.TOKENS_KIND
        if registry.readout_of(arch) != "cls":
            if args.avgpool_patchtokens or (args.n_last_blocks is not None and args.sparo_features == "encoding"):
                raise ValueError(f"--n_last_blocks/--avgpool_patchtokens apply to CLS archs; {arch} is probed "
                                 "on its read-out's encoding (--n_last_blocks also counts with --sparo_features "
                                 "encoding+cls)")
            return extraction.feature_kind(arch, n_last_blocks, sparo_features=args.sparo_features)
        if args.sparo_features != "encoding":
            raise ValueError(f"--sparo_features {args.sparo_features} applies to read-outs that replace the last "
                             f"block ({registry.arch_patterns('replaces_block')}), not {arch}")
        return extraction.feature_kind(arch, n_last_blocks, args.avgpool_patchtokens)
    return kind_for


def num_classes(args: argparse.Namespace, data_classes: int) -> int:
    """The data's class count; the official --num_labels may only confirm it (a wider head would hide a mix-up)."""
    if args.num_labels is not None and args.num_labels != data_classes:
        raise ValueError(f"--num_labels {args.num_labels} does not match the {data_classes} classes of the data")
    return data_classes


@dataclass
class ProbeTestSet:
    """A --test_sets entry as a probe evaluates it: its batches (images, or features with --fast) and classes."""
    batches: Callable[[], linear_probe.Batches]
    present: torch.Tensor | None  # training classes it holds (predictions restricted to them); None: all
    info: dict[str, Any]  # shifted_sets.describe


@dataclass
class Probe:
    """What training and --evaluate need, built the same way for both protocols."""
    classifier: nn.Module  # a LinearClassifier (or AttentiveClassifier), or a HeadGrid of them for --fast's lr grid
    model: nn.Module  # what gets optimized (the DDP wrapper of classifier when distributed)
    featurize: Callable[[torch.Tensor], torch.Tensor]
    train_batches: Callable[[int], linear_probe.Batches]
    val_batches: Callable[[], linear_probe.Batches]
    run: dict[str, Any]  # what defines the probe; a resumed checkpoint must record the same
    output_dir: str
    device: torch.device
    reduce: bool  # whether train and val metrics are summed over ranks
    holdout_batches: Callable[[], linear_probe.Batches] | None = None  # --fast lr grid: chooses the head
    test_sets: dict[str, ProbeTestSet] = field(default_factory=dict)
    features: FeatureSet | None = None  # --fast: every extracted feature (few-shot heads draw from its train split)
    make_head: Callable[[], nn.Module] | None = None  # --fast: one fresh head of the probe (few-shot heads)


def _output_dir(args: argparse.Namespace, tag: str, protocol: str) -> str:
    if args.output_dir is not None:
        return args.output_dir
    prefix = f"{args.probe}_fast" if protocol == "fast" else "linear"
    return os.path.join(eval_flags.default_output_dir(args), f"{prefix}_{tag}")


def official_probe(args: argparse.Namespace, info: distributed.DistInfo) -> Probe:
    """Official protocol: augmented images through the frozen backbone every step, all ranks."""
    backbone, options, tag = weights.load_backbone(args)
    backbone.to(info.device)
    kind = kind_resolver(args)(options["arch"])
    featurize = extraction.feature_function(backbone, kind)
    # Augmentation seeded per (seed, epoch, sample): a resumed probe sees the crops it would have seen.
    train_set, val_set = extraction.build_splits(args.dataset, eval_flags.data_path(args),
                                                 augmentation.linear_train_transform(args.crop_size),
                                                 augmentation.eval_transform(args.resize_size, args.crop_size))
    train_set = augmentation.SeededDataset(train_set, args.seed)
    with torch.no_grad():
        dim = featurize(torch.zeros(1, 3, args.crop_size, args.crop_size, device=info.device)).shape[1]
    classes = num_classes(args, len(train_set.classes))
    torch.manual_seed(args.seed)
    classifier = linear_probe.LinearClassifier(dim, classes).to(info.device)
    model: nn.Module = classifier
    if info.world_size > 1:
        model = DistributedDataParallel(classifier, device_ids=[info.device] if info.device.type == "cuda" else None)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=args.seed)
    pin = info.device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=args.batch_size_per_gpu, sampler=sampler,
                              num_workers=args.num_workers, pin_memory=pin, worker_init_fn=ignore_stop_signals)

    def eval_loader(dataset: torch.utils.data.Dataset) -> DataLoader:  # each rank its shard, metrics summed
        return DataLoader(dataset, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                          worker_init_fn=ignore_stop_signals,
                          sampler=extraction.ShardSampler(len(dataset), info.rank, info.world_size), pin_memory=pin)
    val_loader = eval_loader(val_set)
    tests = shifted_sets.build(shifted_sets.parse_specs(args.test_sets), train_set.classes,
                            augmentation.eval_transform(args.resize_size, args.crop_size))

    def train_batches(epoch: int) -> linear_probe.Batches:
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        return interruption.guarded(train_loader)

    total_batch = args.batch_size_per_gpu * info.world_size
    run = {"protocol": "official", "kind": kind, "dim": dim, "num_classes": classes, "tag": tag,
           "epochs": args.epochs, "lr": scaled_lr(args.lr, total_batch), "total_batch_size": total_batch,
           "options": options}
    probe = Probe(classifier, model, featurize, train_batches, lambda: interruption.guarded(val_loader), run,
                  _output_dir(args, tag, "official"), info.device, reduce=True)
    for test in tests:
        loader = eval_loader(test.dataset)
        described = shifted_sets.describe(test.spec.path, len(test.dataset), test.present, classes)
        probe.test_sets[test.spec.name] = ProbeTestSet(lambda loader=loader: interruption.guarded(loader),
                                                       test.present, described)
    return probe


def fast_probe(args: argparse.Namespace, info: distributed.DistInfo, at_init: bool = False) -> Probe | None:
    """Fast mode: features extracted once (all ranks), classifier trained on the main process (None elsewhere).

    With several --lr_grid values the classifier is one head per lr (linear_probe.LinearHeads), trained on the
    train features minus a seeded hold-out that chooses among them (`holdout_batches`). `at_init`: the same probe
    on the features of the run's random-init network (main puts it in the trained probe's init_baseline/).

    The features stay in host memory and each batch moves to the device when the step needs it: the device then
    holds the heads and one batch, not the 21 GB of an ImageNet SPARO bank. Not fp16 features on the device
    instead: that still holds 10.5 GB, and the encodings are unnormalized, so fp16 would round (or overflow) the
    very inputs whose probe accuracy is reported."""
    data = eval_flags.compute_features(args, info.device, kind_resolver(args), at_init=at_init)
    return None if data is None else probe_on_features(args, data, info.device, at_init)


def probe_on_features(args: argparse.Namespace, data: FeatureSet, device: torch.device, at_init: bool = False
                      ) -> Probe:
    """The fast probe of `data`, however it was made (a backbone, a cache, or the raw pixels the read-out comparison
    probes with the same grid and hold-out); `train(args, probe)` then trains it."""
    train_features, train_labels = data.train_features, data.train_labels
    val_features, val_labels = data.val_features, data.val_labels
    classes = num_classes(args, data.num_classes)
    lrs = [scaled_lr(lr, args.batch_size_per_gpu) for lr in args.lr_grid]
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None
    if len(lrs) > 1 and not args.evaluate:
        cut = max(1, round(args.holdout_fraction * len(train_labels)))
        held, kept = seeded_split(len(train_labels), cut, args.seed)
        holdout = (train_features[held], train_labels[held])
        train_features, train_labels = train_features[kept], train_labels[kept]
    make_head = head_factory(args, data, train_features.shape[1], classes)
    torch.manual_seed(args.seed)
    classifier: nn.Module = (linear_probe.HeadGrid(make_head, lrs) if holdout is not None else make_head()
                             ).to(device)

    train_batches = _shuffled_batches(train_features, train_labels, args)

    def val_batches() -> linear_probe.Batches:
        return linear_probe.tensor_batches(val_features, val_labels, args.batch_size_per_gpu)

    run = {"protocol": "fast", "kind": data.meta["kind"], "dim": train_features.shape[1], "num_classes": classes,
           "tag": data.meta["tag"], "epochs": args.epochs, "lr": lrs[0] if len(lrs) == 1 else lrs,
           "total_batch_size": args.batch_size_per_gpu, "options": data.meta["options"]}
    if at_init:
        run["at_init"] = True  # a resumed head must come from the same network
    if args.probe != "linear":
        run["probe"] = args.probe  # (absent for the linear probe, whose earlier checkpoints did not record it)
    if "pca" in data.meta:
        run["pca_dim"] = data.meta["pca"]["dim"]  # at the features' own width, the same "dim" as without PCA
    probe = Probe(classifier, classifier, lambda x: x, train_batches, val_batches, run,
                  _output_dir(args, data.meta["tag"], "fast"), device, reduce=False, features=data,
                  make_head=make_head)
    for name, test in data.test_sets.items():
        probe.test_sets[name] = ProbeTestSet(_feature_batches(test, args.batch_size_per_gpu), test.present,
                                             test.describe(classes))
    if holdout is not None:
        probe.run["holdout_fraction"] = args.holdout_fraction
        probe.holdout_batches = lambda: linear_probe.tensor_batches(*holdout, args.batch_size_per_gpu)
    return probe


def head_factory(args: argparse.Namespace, data: FeatureSet, dim: int, classes: int) -> Callable[[], nn.Module]:
    """A function building one fresh head of --probe for features of width `dim`."""
    if args.probe == "linear":
        return lambda: linear_probe.LinearClassifier(dim, classes)
    num_tokens, embed_dim = extraction.token_shape(data.meta["options"], data.meta["crop_size"], dim)
    return lambda: linear_probe.AttentiveClassifier(embed_dim, num_tokens, classes)


def _shuffled_batches(features: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace
                      ) -> Callable[[int], linear_probe.Batches]:
    """--fast's train batches: epoch e reshuffled from (seed, e), so a resumed probe sees the same batches."""
    def batches(epoch: int) -> linear_probe.Batches:
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        return linear_probe.tensor_batches(features, labels, args.batch_size_per_gpu, generator)
    return batches


def _feature_batches(data: EvalSet, batch_size: int) -> Callable[[], linear_probe.Batches]:
    return lambda: linear_probe.tensor_batches(data.features, data.labels, batch_size)


def trained_head(probe: Probe, trained: dict[str, Any]) -> nn.Module:
    """The head a probe reports on the test set: the lr grid's choice, or the single head after its last epoch."""
    return probe.classifier.heads[trained["lr_grid"]["chosen"]] if "lr_grid" in trained else probe.classifier


def evaluate_test_sets(probe: Probe, head: nn.Module) -> dict[str, dict[str, Any]]:
    """`head` on each --test_sets entry, predicting among the classes the set holds (every rank calls this: the
    official protocol's test images are sharded over the ranks like val's)."""
    return {name: {**test.info, **linear_probe.evaluate(RestrictedHead(head, test.present), test.batches(),
                                                        probe.featurize, probe.run["num_classes"], probe.device,
                                                        probe.reduce)}
            for name, test in probe.test_sets.items()}


def fewshot_probes(args: argparse.Namespace, probe: Probe, lr: float) -> dict[str, Any]:
    """--n_per_class: for each n and try, a head trained on n cached train features per class (the draw of
    sparo_dino/eval/fewshot.py) with the full probe's lr (chosen on its train hold-out), then scored on val and every
    test set. Each head resumes from its own folder under fewshot/."""
    data = probe.features
    sets = {VAL_NAME: EvalSet(data.val_features, data.val_labels, None), **data.test_sets}
    classes = probe.run["num_classes"]

    def evaluate(n: int, attempt: int, indices: torch.Tensor) -> fewshot.TryResult:
        torch.manual_seed(args.seed)
        head = probe.make_head().to(probe.device)
        run = {**probe.run, "lr": lr, "fewshot": {"n_per_class": n, "try": attempt, "seed": args.seed}}
        linear_probe.fit(head, _shuffled_batches(data.train_features[indices], data.train_labels[indices], args),
                         _feature_batches(sets[VAL_NAME], args.batch_size_per_gpu), lambda x: x,
                         num_classes=classes, epochs=args.epochs, lr=lr, val_freq=args.epochs,
                         output_dir=os.path.join(probe.output_dir, FEWSHOT_DIR, f"n{n}_try{attempt}"), run=run,
                         device=probe.device, reduce=False)
        return {name: {probe_name(probe.run): linear_probe.evaluate(
                    RestrictedHead(head, test.present), linear_probe.tensor_batches(test.features, test.labels,
                                                                                    args.batch_size_per_gpu),
                    lambda x: x, classes, probe.device, reduce=False)["top1"]}
                for name, test in sets.items()}

    return {"tries": args.fewshot_tries, "seed": args.seed, "lr": lr,
            "n_per_class": fewshot.run(data.train_labels, args.n_per_class, args.fewshot_tries, args.seed, evaluate,
                                       data.classes)}


def evaluate_extras(args: argparse.Namespace, probe: Probe, trained: dict[str, Any]) -> dict[str, Any]:
    """What --test_sets and --n_per_class add to a trained probe's results (test sets: every rank calls this)."""
    extras: dict[str, Any] = {}
    if probe.test_sets:
        extras["test_sets"] = evaluate_test_sets(probe, trained_head(probe, trained))
    if args.n_per_class:  # --fast only: the probe lives on the main process
        extras["fewshot"] = fewshot_probes(args, probe, trained["lr_grid"]["chosen_lr"] if "lr_grid" in trained
                                           else probe.run["lr"])
    return extras


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The closing table (sparo_dino/eval/results_table.py): the final head's top-1 on val and each test set, few-shot
    means, and the random-init probe's beside them when asked."""
    column = probe_name(results["run"])

    def top1(probed: dict[str, Any]) -> dict[str, dict[str, float]]:
        val = probed["final"] if "final" in probed else probed["evaluate"]
        return {VAL_NAME: {column: val["top1"]},
                **{name: {column: test["top1"]} for name, test in probed.get("test_sets", {}).items()}}

    val = results["final"] if "final" in results else results["evaluate"]
    sizes = {VAL_NAME: (val["num_samples"], results["run"]["num_classes"]),
             **{name: (test["num_test"], test["num_classes"]) for name, test in results.get("test_sets", {}).items()}}
    initial = results.get("init_baseline")
    return results_table.build_rows(sizes, top1(results), results.get("fewshot", {}).get("n_per_class"),
                                 top1(initial) if initial else None,
                                 (initial or {}).get("fewshot", {}).get("n_per_class"))


def evaluate_head(args: argparse.Namespace, probe: Probe) -> dict[str, Any] | None:
    """--evaluate: validate a trained head on this probe's features and print official DINO's lines."""
    path = args.linear_weights or os.path.join(probe.output_dir, linear_probe.CHECKPOINT_NAME)
    linear_probe.load_head(path, probe.classifier, probe.run)
    metrics = linear_probe.evaluate(probe.classifier, probe.val_batches(), probe.featurize, probe.run["num_classes"],
                                    probe.device, probe.reduce)
    tests = evaluate_test_sets(probe, probe.classifier)
    if not distributed.is_main_process():
        return None
    print(f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.3f}\n"
          f"Accuracy of the network on the {metrics['num_samples']} test images: {metrics['top1']:.1f}%", flush=True)
    results = {"evaluate": metrics, "linear_weights": os.path.abspath(path), "run": probe.run}
    if tests:
        results["test_sets"] = tests
        results["table"] = table_rows(results)
        print("\n".join(results_table.format_rows(results["table"], results_table.title(
            f"{probe_name(probe.run)} probe (this head)"))))
    return results


def probe_name(run: dict[str, Any]) -> str:
    """Which probe a run trained: "linear" or "attentive" (the table's column and the printed lines say it)."""
    return run.get("probe", "linear")


def summary_line(results: dict[str, Any]) -> str:
    """The headline is the best top-1 over the validations (official DINO's "Max accuracy"); final beside it."""
    final, best = results["final"], results["best"]
    protocol = linear_probe.PROTOCOLS[results["run"]["protocol"]]
    name = probe_name(results["run"]).capitalize()
    line = (f"{name} probe result [{protocol}]: best Top1: {best['top1']:.2f} (epoch {best['epoch']}, "
            f"Top5 {best['top5']:.2f}), final Top1: {final['top1']:.2f}, Top5: {final['top5']:.2f}")
    if "lr_grid" in results:
        grid = results["lr_grid"]
        line += (f"; lr {grid['chosen_lr']:g} chosen among {len(grid['lrs'])} on a "
                 f"{results['run']['holdout_fraction']:g} train hold-out (best is the last epoch: the test set "
                 "picks nothing)")
    return line


def init_baseline_line(results: dict[str, Any]) -> str:
    """The trained probe next to the same probe on the random-init network: the final top-1 of each (the lr grid's
    choice is made on the train hold-out, so final is what both report)."""
    initial = results["init_baseline"]
    protocol = linear_probe.PROTOCOLS[results["run"]["protocol"]]
    line = (f"{probe_name(results['run']).capitalize()} probe at random init (same arch, seed and images) "
            f"[{protocol}]: final Top1: "
            f"{initial['final']['top1']:.2f}, Top5: {initial['final']['top5']:.2f}")
    if "lr_grid" in initial:
        line += f"; lr {initial['lr_grid']['chosen_lr']:g} chosen on the same hold-out"
    gain = results["final"]["top1"] - initial["final"]["top1"]
    return line + f"; trained minus init: {gain:+.2f} points of Top1"


def train(args: argparse.Namespace, probe: Probe) -> dict[str, Any]:
    """Train `probe`'s head (every head of an lr grid) and validate it; resumes from its output folder."""
    os.makedirs(probe.output_dir, exist_ok=True)
    interruption.note_saved(probe.output_dir, lambda: saved_probe(probe, args.epochs))
    if probe.holdout_batches is not None:
        return linear_probe.fit_lr_grid(probe.classifier, probe.train_batches, probe.holdout_batches,
                                        probe.val_batches, num_classes=probe.run["num_classes"], epochs=args.epochs,
                                        output_dir=probe.output_dir, run=probe.run, device=probe.device)
    return linear_probe.fit(probe.classifier, probe.train_batches, probe.val_batches, probe.featurize,
                            num_classes=probe.run["num_classes"], epochs=args.epochs, lr=probe.run["lr"],
                            val_freq=args.val_freq, output_dir=probe.output_dir, run=probe.run, device=probe.device,
                            reduce=probe.reduce, model=probe.model)


def saved_probe(probe: Probe, epochs: int) -> str | None:
    """What a rerun of an interrupted probe continues from: its checkpoint and the epochs it holds."""
    path = os.path.join(probe.output_dir, linear_probe.CHECKPOINT_NAME)
    if not os.path.isfile(path):
        return None
    return f"the linear probe's checkpoint {path} ({load_checkpoint(path)['epoch']} of {epochs} epochs)"


def check_args(args: argparse.Namespace) -> None:
    """Flags that cannot work together, refused before any process group, file or model is touched."""
    if args.epochs < 1 or args.val_freq < 1:
        raise ValueError("--epochs and --val_freq must be >= 1")
    if args.num_labels is not None and args.num_labels < 1:
        raise ValueError(f"--num_labels must be >= 1, got {args.num_labels}")
    if not args.fast and (args.load_features or args.dump_features):
        raise ValueError("--load_features/--dump_features need --fast: the official protocol augments every step")
    if args.linear_weights is not None and not args.evaluate:
        raise ValueError("--linear_weights is read by --evaluate only")
    if args.fast and args.lr != build_parser().get_default("lr"):
        raise ValueError("--fast trains one head per --lr_grid value; for a single lr give --lr_grid LR (--lr is the "
                         "official protocol's)")
    if args.init_baseline and (not args.fast or args.evaluate or args.load_features):
        raise ValueError("--init_baseline needs --fast training from --pretrained_weights (a training checkpoint), "
                         "not the official protocol, --evaluate or --load_features")
    if args.lr <= 0 or min(args.lr_grid) <= 0 or not 0 < args.holdout_fraction < 1:
        raise ValueError("--lr and --lr_grid values must be > 0 and --holdout_fraction in (0, 1)")
    if args.n_per_class and (not args.fast or args.evaluate):
        raise ValueError("--n_per_class trains few-shot heads on cached centre-crop features: it needs --fast "
                         "training, not the official protocol or --evaluate")
    if args.probe == "attentive" and (not args.fast or args.n_last_blocks is not None or args.avgpool_patchtokens
                                      or args.sparo_features != "encoding"):
        raise ValueError("--probe attentive trains on cached tokens: it needs --fast, and reads all final-norm tokens "
                         "(not --n_last_blocks, --avgpool_patchtokens or --sparo_features)")
    eval_flags.check_robustness_args(args)
    eval_flags.check_pca_args(args, {
        "the official protocol": "" if args.fast else "the components are fitted on cached train features (--fast), "
        "not on augmented crops",
        "--probe attentive": "it reads tokens, not one feature vector" if args.probe == "attentive" else ""})
    distributed.check_launcher_args(args)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = config.parse_args(build_parser(), argv)
    check_args(args)
    eval_flags.check_output_dirs(args)
    with distributed.process_group(args.dist_timeout_minutes, report_error=eval_flags.print_user_error) as info:
        # the baseline first: a checkpoint that cannot give it fails before the long extraction
        initial = fast_probe(args, info, at_init=True) if args.init_baseline else None
        probe = fast_probe(args, info) if args.fast else official_probe(args, info)
        if probe is None:
            return None
        if args.evaluate:
            return evaluate_head(args, probe)
        results = train(args, probe)
        results.update(evaluate_extras(args, probe, results))
        if not distributed.is_main_process():
            return None
        results = {**results, "run": probe.run,
                   "provenance": provenance.collect(args_to_dict(args), {"world_size": info.world_size})}
        print(summary_line(results), flush=True)
        if initial is not None:  # beside the trained head, whatever the init features' tag
            initial.output_dir = os.path.join(probe.output_dir, INIT_BASELINE_DIR)
            trained_at_init = train(args, initial)
            results["init_baseline"] = {**trained_at_init, **evaluate_extras(args, initial, trained_at_init),
                                        "run": initial.run}
            print(init_baseline_line(results), flush=True)
        if args.test_sets or args.n_per_class:
            results["table"] = table_rows(results)
            print("\n".join(results_table.format_rows(results["table"], results_table.title(
                f"{probe_name(results['run'])} probe [{results['run']['protocol']}], final head",
                results.get("fewshot")))), flush=True)
        provenance.save_config(args_to_dict(args), probe.output_dir, name="config_linear.yaml")
        eval_flags.write_results(results, os.path.join(probe.output_dir, "results_linear.json"))
        return results


if __name__ == "__main__":
    eval_flags.run_cli(main)
